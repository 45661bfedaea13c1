//! `knib demo`: the whole job on a disk the demo makes. Two volumes get
//! known patterns (written by `qemu-io`, as a guest would), are backed up
//! full, changed, backed up incrementally twice, the last backup compressed,
//! everything verified, and each backup restored and compared with a copy of
//! the disks taken at that backup.

use std::path::{Path, PathBuf};

use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::engine::CompressOptions;
use knib_core::process::Invocation;
use knib_core::qemu_img::{Convert, ImageFormat, QemuImg};
use knib_core::{Control, ErrorKind, KnibError, Result};

fn qemu_io(disk: &Path, cmd: &str) -> Result<()> {
    let f = Invocation::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(disk)
        .run_ok(&Control::new(), ErrorKind::ImageTool)?;
    if f.stdout.contains("error") || f.stdout.contains("failed") {
        return Err(KnibError::new(ErrorKind::ImageTool, format!("qemu-io {cmd}: {}", f.stdout.trim())));
    }
    Ok(())
}

fn step(n: &mut u32, text: &str) {
    *n += 1;
    println!("[{n}] {text}");
}

/// Run the demo in `dir` (or a new temporary directory).
pub fn run(dir: Option<PathBuf>, ctl: &Control) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("knib-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| KnibError::io("cannot create", &dir, e))?;
    let dir = dir.canonicalize().map_err(|e| KnibError::io("cannot resolve", &dir, e))?;
    let q = QemuImg::new();
    let nctl = Control::new();
    let disks_dir = dir.join("disks");
    let refs = dir.join("at-backup");
    let restored = dir.join("restored");
    for d in [&disks_dir, &refs, &restored] {
        std::fs::create_dir_all(d).map_err(|e| KnibError::io("cannot create", d, e))?;
    }
    let store = Store::create(dir.join("store"))?;
    let root = disks_dir.join("root.qcow2");
    let data = disks_dir.join("data.qcow2");
    let mut n = 0;
    println!("knib {} demo in {}", knib_core::VERSION, dir.display());
    for (p, size) in [(&root, 256u64 << 20), (&data, 128 << 20)] {
        if p.exists() {
            return Err(KnibError::invalid(format!("{} exists: give the demo an empty --dir", p.display())));
        }
        q.create(p, size, &nctl)?;
    }
    step(&mut n, "made VM 'demo' with disks root (256 MiB) and data (128 MiB), qcow2");
    let disks = vec![
        DiskSpec { name: "root".into(), path: root.clone() },
        DiskSpec { name: "data".into(), path: data.clone() },
    ];
    // Text-like (compressible) data and a few distinct patterns.
    let writes: [&[(&Path, &str)]; 3] = [
        &[(&root, "write -P 0x41 0 64M"), (&data, "write -P 0x61 0 32M")],
        &[(&root, "write -P 0x42 16M 8M"), (&data, "write -z 4M 4M"), (&data, "write -P 0x62 100M 1M")],
        &[(&root, "write -P 0x43 200M 20M"), (&root, "discard 0 1M")],
    ];
    let mut ids = Vec::new();
    for (round, w) in writes.iter().enumerate() {
        for (disk, cmd) in w.iter() {
            qemu_io(disk, cmd)?;
        }
        let what: Vec<String> =
            w.iter().map(|(d, c)| format!("{}: {c}", d.file_stem().unwrap_or_default().to_string_lossy())).collect();
        step(&mut n, &format!("guest writes ({})", what.join("; ")));
        for d in &disks {
            let r = refs.join(format!("{}-{}.qcow2", d.name, round + 1));
            q.convert(&Convert { source: d.path.clone(), dest: r, ..Default::default() }, &nctl)?;
        }
        let m = store.backup("demo", &disks, &BackupOptions::default(), ctl)?;
        let size: u64 = m.volumes.iter().map(|v| v.size).sum();
        step(
            &mut n,
            &format!(
                "backup {} taken: {}{}, {} on the store",
                m.id,
                m.kind.as_str(),
                m.parent.as_deref().map(|p| format!(" on {p}")).unwrap_or_default(),
                knib_core::fsio::human_bytes(size)
            ),
        );
        ids.push(m.id);
    }
    for d in &disks {
        let chain = q.info_chain(&d.path, &nctl)?;
        step(
            &mut n,
            &format!("disk {} still runs on {} with {} file(s) in its chain", d.name, d.path.display(), chain.len()),
        );
    }
    let first = ids[0].clone();
    let m = store.compress(&first, &CompressOptions::default(), ctl)?;
    let c = m.compression.as_ref().expect("compressed");
    step(
        &mut n,
        &format!(
            "compressed full backup {first} with {}: {} -> {} (later backups still use it as their base)",
            c.library.as_str(),
            knib_core::fsio::human_bytes(c.original_size),
            knib_core::fsio::human_bytes(c.size)
        ),
    );
    for r in store.verify(None, ctl)? {
        if !r.ok {
            return Err(KnibError::corrupt(format!("backup {} failed verification: {}", r.id, r.problems.join("; "))));
        }
        step(&mut n, &format!("verified backup {}: qemu-img check clean, chain intact, hash recorded", r.id));
    }
    for (i, id) in ids.iter().enumerate() {
        for d in &disks {
            let fmt = if i == 0 { ImageFormat::Raw } else { ImageFormat::Qcow2 };
            let to = restored.join(format!("{}-{}.{}", d.name, i + 1, fmt.as_str()));
            store.restore(id, &d.name, &to, fmt, ctl)?;
            let reference = refs.join(format!("{}-{}.qcow2", d.name, i + 1));
            if !q.compare(&to, &reference, &nctl)? {
                return Err(KnibError::corrupt(format!(
                    "restored {} differs from the disk at backup {id}",
                    to.display()
                )));
            }
            step(
                &mut n,
                &format!(
                    "restored {} of backup {id} to {}: identical to the disk at that backup",
                    d.name,
                    to.display()
                ),
            );
        }
    }
    println!("demo finished: {} backups, all restored identical; files are in {}", ids.len(), dir.display());
    Ok(())
}
