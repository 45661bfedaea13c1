//! The commands on a vault (`--store s3://BUCKET/PREFIX`): list, show,
//! restore, verify and delete read and change the vault by S3 requests;
//! `knib sync` sends a store's backups there.

use std::path::Path;

use knib_core::api::BackupView;
use knib_core::catalog::Manifest;
use knib_core::qemu_img::ImageFormat;
use knib_core::vault::Vault;
use knib_core::{Control, KnibError, Result};

use crate::output;

/// The vault location `store` names, if it names one.
pub fn location(store: &Path) -> Option<&str> {
    store.to_str().filter(|s| knib_core::vault::is_vault(s))
}

fn backup_json(v: &Vault, m: &Manifest) -> Result<serde_json::Value> {
    output::json_value(serde_json::to_value(BackupView::in_vault(v, m)))
}

fn print_backup(v: &Vault, m: &Manifest, json: bool) -> Result<()> {
    if json {
        println!("{}", backup_json(v, m)?);
        return Ok(());
    }
    println!("{}", output::backup_line(m));
    for vol in &m.volumes {
        println!(
            "  {}: {}/vms/{}/{}/{} ({} virtual, {} stored)",
            vol.name,
            v.location(),
            m.vm,
            m.id,
            vol.file,
            knib_core::fsio::human_bytes(vol.virtual_size),
            knib_core::fsio::human_bytes(vol.size)
        );
    }
    Ok(())
}

/// `knib list --store s3://...`.
pub fn list(loc: &str, vm: Option<&str>, json: bool) -> Result<()> {
    let v = Vault::open(loc)?;
    let list = v.list(vm)?;
    if json {
        let arr = list.iter().map(|m| backup_json(&v, m)).collect::<Result<Vec<serde_json::Value>>>()?;
        println!("{}", serde_json::Value::Array(arr));
    } else if list.is_empty() {
        println!("no backups");
    } else {
        for m in &list {
            println!("{}", output::backup_line(m));
        }
    }
    Ok(())
}

/// `knib show --store s3://...`.
pub fn show(loc: &str, id: &str, json: bool) -> Result<()> {
    let v = Vault::open(loc)?;
    print_backup(&v, &v.show(id)?, json)?;
    Ok(())
}

/// `knib restore --store s3://...`.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    loc: &str,
    id: &str,
    volume: String,
    to: &Path,
    format: ImageFormat,
    verify: bool,
    json: bool,
    ctl: &Control,
) -> Result<()> {
    let v = Vault::open(loc)?;
    let r = v.restore(id, &volume, to, format, verify, ctl)?;
    output::clear_progress();
    let text = format!(
        "restored volume {volume} of backup {id} from {loc} to {} ({}; {} fetched)",
        to.display(),
        format.as_str(),
        knib_core::fsio::human_bytes(r.bytes_fetched)
    );
    output::say(json, || serde_json::to_value(knib_core::api::catalog::restored(volume, to.to_path_buf())), &text)?;
    Ok(())
}

/// `knib verify --store s3://...`.
pub fn verify(loc: &str, id: Option<&str>, json: bool, ctl: &Control) -> Result<()> {
    let v = Vault::open(loc)?;
    let out = v.verify(id, ctl)?;
    output::clear_progress();
    output::print_verify(&out.reports, json)?;
    if let Some(bad) = out.reports.iter().find(|r| !r.ok) {
        return Err(KnibError::corrupt(format!("backup {} failed verification: {}", bad.id, bad.problems.join("; "))));
    }
    Ok(())
}

/// `knib delete --store s3://...`.
pub fn delete(loc: &str, id: &str, json: bool) -> Result<()> {
    let v = Vault::open(loc)?;
    let out = v.delete(id)?;
    let text = if out.marked_removed.is_empty() {
        format!("deleted {} from {loc}", out.expunged.join(", "))
    } else {
        format!(
            "backup {id} is marked removed in {loc}: {}",
            out.kept_because.as_deref().unwrap_or("later backups depend on it")
        )
    };
    output::say(json, || serde_json::to_value(&out), &text)?;
    Ok(())
}

/// `knib sync`.
/// `knib backup --vault`: a backup of plain disks written straight to the vault.
pub fn backup(
    store: &Path,
    to: &str,
    vm: &str,
    disks: &[knib_core::catalog::DiskSpec],
    opts: &knib_core::catalog::BackupOptions,
    json: bool,
    ctl: &Control,
) -> Result<()> {
    if location(Path::new(to)).is_none() {
        return Err(KnibError::invalid(format!("--vault {to:?} is not a vault (s3://BUCKET/PREFIX)")));
    }
    let store = knib_core::catalog::Store::create(store)?;
    let v = Vault::open(to)?;
    let m = v.backup_direct(&store, vm, disks, opts, &knib_core::vault::SyncOptions::direct(), ctl)?;
    output::clear_progress();
    print_backup(&v, &m, json)?;
    Ok(())
}

/// `knib backup --domain NAME --vault LOCATION`.
pub fn backup_domain(
    store: &Path,
    to: &str,
    vm: &knib_core::libvirt::Vm,
    opts: &knib_core::catalog::BackupOptions,
    quiesce: bool,
    json: bool,
    ctl: &Control,
) -> Result<()> {
    let v = open(to)?;
    let store = knib_core::catalog::Store::create(store)?;
    let m = v.backup_domain_direct(&store, vm, opts, quiesce, &knib_core::vault::SyncOptions::direct(), ctl)?;
    output::clear_progress();
    print_backup(&v, &m, json)?;
    Ok(())
}

/// The vault at `to`, refused when it is not `s3://BUCKET/PREFIX`.
pub fn open(to: &str) -> Result<Vault> {
    if location(Path::new(to)).is_none() {
        return Err(KnibError::invalid(format!("--vault {to:?} is not a vault (s3://BUCKET/PREFIX)")));
    }
    Vault::open(to)
}

pub fn sync(store: &Path, to: &str, opts: &knib_core::vault::SyncOptions, json: bool, ctl: &Control) -> Result<()> {
    if location(Path::new(to)).is_none() {
        return Err(KnibError::invalid(format!("--to {to:?} is not a vault (s3://BUCKET/PREFIX)")));
    }
    let store = knib_core::catalog::Store::open(store)?;
    let v = Vault::open(to)?;
    let r = v.sync_from(&store, opts, ctl)?;
    output::clear_progress();
    let mut text = if r.sent.is_empty() && r.repaired.is_empty() {
        format!("{to} has every backup already ({} present)", r.present.len())
    } else if r.sent.is_empty() {
        format!("{to} has every backup ({} present)", r.present.len())
    } else {
        format!("sent {} to {to} ({})", r.sent.join(", "), knib_core::fsio::human_bytes(r.bytes_sent))
    };
    if opts.check {
        text.push_str(&format!("; checked {} of its objects", knib_core::fsio::human_bytes(r.bytes_checked)));
    }
    if !r.repaired.is_empty() {
        text.push_str(&format!("; sent again the lost objects of {}", r.repaired.join(", ")));
    }
    for d in &r.damaged {
        text.push_str(&format!("\nDAMAGED in the vault, not repaired: {d}"));
    }
    output::say(json, || serde_json::to_value(&r), &text)?;
    // The report is said; the exit status says the vault is not whole
    // where this store could have mended it.
    if !r.unmended.is_empty() {
        return Err(knib_core::KnibError::corrupt(format!(
            "{to} holds backups this store could not mend ({}): they cannot be restored from it",
            r.unmended.join(", ")
        )));
    }
    Ok(())
}

/// `knib restore --store s3://... BACKUP --quick --domain NAME`: start the
/// stopped domain at once on overlays backed by NBD exports of the
/// backup's volumes, served by a detached `knib vault-serve` that reads
/// the vault by ranged GETs; `knib consolidate` pulls the data in and
/// stops it.
pub fn quick_restore(loc: &str, id: &str, domain: &str, connect: &str, json: bool, ctl: &Control) -> Result<()> {
    let v = Vault::open(loc)?;
    let hv = knib_core::libvirt::Hypervisor::open(connect)?;
    let dom = hv.domain(domain)?;
    let mut spawn = |dir: &Path| spawn_server(loc, id, dir);
    let st = knib_core::vault::serve::quick_restore_domain(
        &v,
        &knib_core::qemu_img::QemuImg::new(),
        id,
        &dom,
        &mut spawn,
        ctl,
    )?;
    let overlays: Vec<(String, std::path::PathBuf)> =
        st.disks.iter().map(|d| (d.target.clone(), d.overlay.clone())).collect();
    let kept = knib_core::catalog::disks_not_restored(&dom, &overlays);
    let text: Vec<String> = overlays.iter().map(|(t, o)| format!("{t} on {}", o.display())).collect();
    output::say(
        json,
        || {
            Ok(serde_json::json!({
                "restored": id, "domain": domain, "overlays": serde_json::to_value(&overlays)?,
                "kept": serde_json::to_value(&kept)?, "vault": loc, "server_pid": st.pid
            }))
        },
        &format!(
            "domain {domain} started on overlays of backup {id} served from {loc} by process {}: {}{}; run `knib consolidate --domain {domain}` to pull the data in",
            st.pid,
            text.join(", "),
            kept_text(&kept)
        ),
    )?;
    Ok(())
}

/// What a quick restore's text says of the disks the backup does not have.
pub fn kept_text(kept: &[(String, std::path::PathBuf)]) -> String {
    kept.iter().map(|(t, f)| format!("; {t} is not in the backup and stays on {}, as it is", f.display())).collect()
}

/// Start this program's `vault-serve` for backup `id` of vault `loc` on `dir`.
fn spawn_server(loc: &str, id: &str, dir: &Path) -> Result<u32> {
    let exe = std::env::current_exe()
        .map_err(|e| KnibError::internal(format!("cannot find knib's own program to start the NBD server: {e}")))?;
    knib_core::vault::serve::spawn_server(&exe, loc, id, dir)
}

/// Before `knib consolidate`: start again the vault's server of a quick
/// restore onto `dom` whose server is gone (see
/// `knib_core::vault::serve::restart_dead`).
pub fn restart_dead_servers(dom: &knib_core::libvirt::Vm, ctl: &Control) -> Result<()> {
    let mut spawn = |st: &knib_core::vault::serve::ServeState, dir: &Path| spawn_server(&st.vault, &st.backup, dir);
    knib_core::vault::serve::restart_dead(dom, &mut spawn, ctl).map(drop)
}

/// `knib vault-serve`: serve every volume of backup `id` on `<dir>/<volume>.sock`
/// until SIGTERM or SIGINT (`knib consolidate` stops it); then write what
/// it fetched from the vault to `<dir>/fetched.json` and end.
pub fn serve(loc: &str, id: &str, dir: &Path) -> Result<()> {
    // SIGTERM and SIGINT are taken by `sigwait` below: blocked here, before
    // any thread starts, so that every thread inherits the mask.
    // SAFETY: plain signal-mask calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let v = Vault::open(loc)?;
    let servers = v.serve_volumes(id, dir)?;
    log::info!("serving {} volumes of backup {id} of {loc} in {}", servers.len(), dir.display());
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals of `set`.
    unsafe { libc::sigwait(&set, &mut sig) };
    drop(servers);
    let fetched = serde_json::json!({"bytes_fetched": v.bytes_fetched(), "get_requests": v.get_requests()});
    knib_core::fsio::write_atomic(&dir.join(knib_core::vault::serve::FETCHED_FILE), fetched.to_string().as_bytes())?;
    log::info!("signal {sig}: the server of backup {id} ends; fetched {fetched}");
    Ok(())
}
