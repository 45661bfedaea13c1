//! The libvirt part: running VMs (placeholder, filled by the live-backup work).
