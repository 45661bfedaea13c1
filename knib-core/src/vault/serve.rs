//! Quick restore straight from the vault: a stopped domain is started at
//! once on qcow2 overlays whose backing files are NBD exports of the
//! backup's volumes, served by a knib process ([`Vault::serve_volumes`],
//! the hidden `knib vault-serve`) that reads each volume's chain by ranged
//! GETs through knib's qcow2 reader: only the clusters the guest (and
//! later the block pull) read are fetched; nothing is downloaded whole.
//! `knib consolidate` pulls the data into the overlays, then
//! [`release_served`] stops the server and removes its sockets.
//!
//! # Layout
//!
//! Beside the domain's disks, a directory `.knib-vault-<domain>/` of mode
//! 0711, owned by knib's user, holding `<volume>.sock` (one UNIX socket per
//! volume, never TCP, owned by QEMU's user, who must connect to it),
//! `serve.json` (the server's pid, the vault, the backup and the sockets:
//! a [`ServeState`]) and `serve.log` (the server's log). QEMU's user can
//! pass through the directory to its sockets but not list it, nor add,
//! replace or remove anything in it: the state file steers what knib (as
//! root) later removes, changes the owner of and serves, so it is trusted
//! only in a directory nobody else can write (knib checks the
//! directory and that every path in the state is the one knib would have
//! made).
//!
//! # Guarantees
//!
//! - The overlays are created only once every socket answers, and a
//!   failure before the domain runs removes the overlays, stops the server
//!   and removes the directory, leaving the domain on its old files.
//! - The server is stopped only when no disk of the domain has a backing
//!   layer in its directory, and only if its pid is still a `vault-serve`
//!   process serving that directory.
//! - While it serves, the vault holds a record of it
//!   (`serving/<backup>/<host>/<domain>.json`, see `serving.rs`): a
//!   delete of the backup, on any host, is busy until the consolidation
//!   stops the server and removes the record.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Vault;
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::libvirt::Vm;
use crate::nbd_server::NbdServer;
use crate::progress::Control;
use crate::qemu_img::QemuImg;

/// The state file of a served quick restore, in its directory.
pub const STATE_FILE: &str = "serve.json";
/// What the server fetched from the vault (`bytes_fetched`,
/// `get_requests`), written by it as it ends, in its directory.
pub const FETCHED_FILE: &str = "fetched.json";
/// The server's log, in its directory.
pub const LOG_FILE: &str = "serve.log";
/// The directory's mode: search for everyone (QEMU's user reaches its
/// sockets), nothing else for anyone but its owner.
const DIR_MODE: u32 = 0o711;

/// How long the server may take to listen on every socket (opening a chain
/// reads its qcow2 headers and tables from the vault).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What a served quick restore recorded (`serve.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServeState {
    /// Schema version (1).
    pub schema: u32,
    /// The pid of the `knib vault-serve` process.
    pub pid: u32,
    /// The vault (`s3://bucket/prefix`).
    pub vault: String,
    /// The backup served.
    pub backup: String,
    /// The domain restored onto.
    pub domain: String,
    /// Each disk target, its overlay and the socket of its backing export.
    pub disks: Vec<ServedDisk>,
}

/// One disk of a served quick restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServedDisk {
    /// The disk target (and the backup's volume).
    pub target: String,
    /// The overlay the disk runs on.
    pub overlay: PathBuf,
    /// The UNIX socket of the NBD export its overlay is backed by.
    pub socket: PathBuf,
}

/// The directory of the sockets of a quick restore of `domain` whose
/// disks are in `disk_dir`.
pub fn serve_dir(disk_dir: &Path, domain: &str) -> PathBuf {
    disk_dir.join(format!(".knib-vault-{domain}"))
}

/// The socket of volume `volume` in `dir`.
pub fn socket_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.sock"))
}

/// The backing name of an overlay on the export at `socket`.
fn nbd_uri(socket: &Path) -> Result<String> {
    let s = socket.to_str().unwrap_or("");
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)) {
        return Err(KnibError::invalid(format!(
            "the NBD socket path {} holds characters an NBD URI would have to escape: put the domain's disks in a directory with a plainer path",
            socket.display()
        )));
    }
    Ok(format!("nbd+unix:///?socket={s}"))
}

impl Vault {
    /// Serve every volume of backup `id` read-only over NBD, each on
    /// `<dir>/<volume>.sock` (see [`socket_path`]), flattened, read through
    /// the volume's chain ([`Vault::volume_chain`]). The servers run until
    /// dropped.
    pub fn serve_volumes(&self, id: &str, dir: &Path) -> Result<Vec<NbdServer>> {
        let m = self.show(id)?;
        let mut out = Vec::new();
        for v in &m.volumes {
            let (chain, name) = self.volume_chain(id, &v.name)?;
            out.push(NbdServer::start(&socket_path(dir, &v.name), &name, Box::new(chain))?);
        }
        Ok(out)
    }
}

/// The uid and gid QEMU runs as under libvirt: `user` and `group` of
/// `/etc/libvirt/qemu.conf`, else Debian's defaults (`libvirt-qemu`,
/// `kvm`) when those exist, else root.
pub fn qemu_ids() -> (u32, u32) {
    let conf = fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    let setting = |key: &str| {
        conf.lines().find_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<u32> {
        if let Some(n) = name.strip_prefix('+') {
            return n.parse().ok();
        }
        let text = fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(field)?.parse().ok()).flatten()
        })
    };
    let uid = lookup("/etc/passwd", &setting("user").unwrap_or_else(|| "libvirt-qemu".into()), 2).unwrap_or(0);
    let gid = lookup("/etc/group", &setting("group").unwrap_or_else(|| "kvm".into()), 2).unwrap_or(0);
    (uid, gid)
}

/// Give the socket at `path` to QEMU's user: only a socket, and without
/// following a symbolic link.
fn chown_socket(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let m = fs::symlink_metadata(path).map_err(|e| KnibError::io("cannot read", path, e))?;
    if !m.file_type().is_socket() {
        return Err(KnibError::corrupt(format!("{} is not the NBD server's socket", path.display())));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| KnibError::io("cannot chown", path, e))
}

/// Whether `dir` can be trusted with a state file: a directory (not a
/// link) owned by knib's user that nobody else can write.
fn check_own_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(dir).map_err(|e| KnibError::io("cannot read", dir, e))?;
    let me = rustix::process::geteuid().as_raw();
    if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(KnibError::corrupt(format!(
            "{} is not a directory knib made (a directory owned by uid {me} that nobody else can write; it is owned by uid {}, mode {:o}): its state file is not trusted. A quick restore from a vault made before this check left it owned by QEMU's user: stop the server it names by hand, then remove the directory",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(s) => s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Whether `pid` is a `vault-serve` process serving `dir`.
fn is_our_server(pid: u32, dir: &Path) -> bool {
    let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    args.contains(&&b"vault-serve"[..]) && args.contains(&dir.as_os_str().as_encoded_bytes())
}

/// Stop the server `pid` of `dir` (SIGTERM, then SIGKILL after 10 s) and
/// remove `dir`; the bytes it fetched from the vault, when it said.
fn stop_server(pid: u32, dir: &Path) -> Result<Option<u64>> {
    if pid > 0 && is_our_server(pid, dir) {
        // SAFETY: kill(2) on a pid checked to be our server.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while alive(pid) && is_our_server(pid, dir) {
            if Instant::now() > until {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let fetched = fs::read(dir.join(FETCHED_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|v| v["bytes_fetched"].as_u64());
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(fetched),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(fetched),
        Err(e) => Err(KnibError::io("cannot remove", dir, e)),
    }
}

/// A server stopped by [`release_served`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Released {
    /// What the quick restore recorded.
    pub state: ServeState,
    /// The bytes the server fetched from the vault, if it said.
    pub bytes_fetched: Option<u64>,
}

/// Quick restore of backup `id` of `vault` onto the stopped domain `vm`:
/// a directory for the sockets is made beside its disks, `spawn(dir)`
/// starts the server (`knib vault-serve`, detached; it returns its pid),
/// and once every socket is there the domain is pointed at new overlays
/// `<target>-restored-<id>.qcow2` backed by the exports and started.
pub fn quick_restore_domain(
    vault: &Vault,
    q: &QemuImg,
    id: &str,
    vm: &Vm,
    spawn: &mut dyn FnMut(&Path) -> Result<u32>,
    ctl: &Control,
) -> Result<ServeState> {
    let m = vault.show(id)?;
    let plan = crate::catalog::quick_restore_targets(&m, vm)?;
    let first = plan.first().ok_or_else(|| KnibError::invalid(format!("backup {id} has no volume")))?;
    let dir = serve_dir(fsio::parent_dir(&first.1), vm.name());
    if dir.exists() {
        return Err(KnibError::invalid(format!(
            "{} exists: domain {} was quick-restored from a vault and not consolidated yet; run `knib consolidate --domain {}` first",
            dir.display(),
            vm.name(),
            vm.name()
        )));
    }
    for (_, _, overlay) in &plan {
        if overlay.exists() {
            return Err(KnibError::invalid(format!("{} already exists; it is not overwritten", overlay.display())));
        }
    }
    let ids = qemu_ids();
    fs::DirBuilder::new().mode(DIR_MODE).create(&dir).map_err(|e| KnibError::io("cannot create", &dir, e))?;
    // Recorded in the vault before anything is served (once the directory
    // exists: a record of this host without it is stale): no delete
    // removes what the domain reads.
    if let Err(e) = vault.record_serving(id, vm.name(), &dir) {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    let mut state = ServeState {
        schema: 1,
        pid: 0,
        vault: vault.location().to_string(),
        backup: id.to_string(),
        domain: vm.name().to_string(),
        disks: plan
            .iter()
            .map(|(t, _, o)| ServedDisk { target: t.clone(), overlay: o.clone(), socket: socket_path(&dir, t) })
            .collect(),
    };
    let mut made = Vec::new();
    // Set when the domain may still name the overlays: they are kept.
    let mut named = false;
    let r = (|| -> Result<()> {
        // The umask may have taken search from others.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(DIR_MODE))
            .map_err(|e| KnibError::io("cannot change the mode of", &dir, e))?;
        state.pid = spawn(&dir)?;
        fsio::write_atomic(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(&state).expect("state serializes"))?;
        wait_for_sockets(&state, &dir, ctl)?;
        for d in &state.disks {
            chown_socket(&d.socket, ids)?;
            let uri = nbd_uri(&d.socket)?;
            let tmp = fsio::TempFile::beside(&d.overlay)?;
            // Written through the file it created, never by name.
            q.create_overlay(&fsio::by_fd(tmp.file()), &uri, "raw", None, ctl)?;
            tmp.commit(&d.overlay, false)?;
            made.push(d.overlay.clone());
        }
        let sources: Vec<(String, PathBuf)> =
            state.disks.iter().map(|d| (d.target.clone(), d.overlay.clone())).collect();
        let old = vm.set_disk_sources_qcow2(&sources)?;
        if let Err(e) = vm.start() {
            if let Err(u) = vm.put_back_definition(&old) {
                // The domain names the overlays: they are kept, and the
                // error says so (removed, the domain named files gone).
                named = true;
                return Err(e.context(format!(
                    "the domain could not be put back on its old files either ({u}): it still names the overlays {}, which are kept",
                    made.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
            return Err(e);
        }
        Ok(())
    })();
    if let Err(e) = r {
        if !named {
            for f in &made {
                let _ = fsio::remove_if_exists(f);
            }
        }
        if let Err(e2) = stop_server(state.pid, &dir) {
            log::warn!("quick restore of {id} onto {}: {e2}", vm.name());
        }
        if let Err(e2) = vault.remove_serving(id, vm.name()) {
            log::warn!("quick restore of {id} onto {}: its record stays in the vault: {e2}", vm.name());
        }
        return Err(e);
    }
    log::info!(
        "domain {} runs on overlays of backup {id} served from vault {} by process {}",
        vm.name(),
        vault.location(),
        state.pid
    );
    Ok(state)
}

/// Wait until every socket of `state` exists, or the server died (its
/// log then says why).
fn wait_for_sockets(state: &ServeState, dir: &Path, ctl: &Control) -> Result<()> {
    let until = Instant::now() + START_TIMEOUT;
    loop {
        ctl.check("start of the vault's NBD server")?;
        if state.disks.iter().all(|d| d.socket.exists()) {
            return Ok(());
        }
        if !alive(state.pid) {
            let log = fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
            let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)");
            return Err(KnibError::internal(format!(
                "the vault's NBD server (pid {}) ended at its start: {last}",
                state.pid
            )));
        }
        if Instant::now() > until {
            return Err(KnibError::new(
                crate::error::ErrorKind::Timeout,
                format!(
                    "the vault's NBD server (pid {}) did not listen on its sockets within {} s",
                    state.pid,
                    START_TIMEOUT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The quick restores from a vault of `vm` still served: each directory
/// beside its disks with a state file, and the state.
fn served(vm: &Vm, disks: &[crate::libvirt::DiskInfo]) -> Result<Vec<(PathBuf, ServeState)>> {
    let mut dirs: Vec<PathBuf> = disks.iter().map(|d| serve_dir(fsio::parent_dir(&d.file), vm.name())).collect();
    dirs.sort();
    dirs.dedup();
    let mut out = Vec::new();
    for dir in dirs {
        if fs::symlink_metadata(&dir).is_err() {
            continue;
        }
        check_own_dir(&dir)?;
        let state_path = dir.join(STATE_FILE);
        let Ok(text) = fs::read(&state_path) else { continue };
        let state: ServeState = crate::json::from_slice(&text)
            .map_err(|e| KnibError::corrupt(format!("{} is corrupted: {e}", state_path.display())))?;
        check_state(&state, &dir, vm.name())
            .map_err(|why| KnibError::corrupt(format!("{} is not what knib wrote: {why}", state_path.display())))?;
        out.push((dir, state));
    }
    Ok(out)
}

/// Whether `state` (read from `dir`) is what [`quick_restore_domain`]
/// writes for domain `domain`: its schema, its domain, and each socket
/// the one of its target in `dir`; why not.
fn check_state(state: &ServeState, dir: &Path, domain: &str) -> std::result::Result<(), String> {
    if state.schema != 1 {
        return Err(format!("schema {} (knib writes 1)", state.schema));
    }
    if state.domain != domain {
        return Err(format!("it names domain {:?}, not {domain:?}", state.domain));
    }
    crate::names::validate("backup id", &state.backup).map_err(|e| e.to_string())?;
    for d in &state.disks {
        crate::names::validate("disk target", &d.target).map_err(|e| e.to_string())?;
        if d.socket != socket_path(dir, &d.target) {
            return Err(format!(
                "the socket of {} is {}, not {}",
                d.target,
                d.socket.display(),
                socket_path(dir, &d.target).display()
            ));
        }
    }
    Ok(())
}

/// Before consolidation: start again the server of each quick restore of
/// `vm` from a vault whose server is gone (the host restarted, or it was
/// killed), with `spawn(state, dir)` (which returns the new pid), so that
/// the overlays' backing exports answer again. Returns the pids started.
/// (A running QEMU does not reconnect to a server that went away: this
/// serves a stopped domain, whose consolidation reads the exports.)
pub fn restart_dead(
    vm: &Vm,
    spawn: &mut dyn FnMut(&ServeState, &Path) -> Result<u32>,
    ctl: &Control,
) -> Result<Vec<u32>> {
    let disks = vm.disks()?;
    let mut out = Vec::new();
    for (dir, mut state) in served(vm, &disks)? {
        if alive(state.pid) && is_our_server(state.pid, &dir) {
            continue;
        }
        log::warn!(
            "domain {}: the vault's NBD server of backup {} (pid {}) is gone: starting it again",
            vm.name(),
            state.backup,
            state.pid
        );
        for d in &state.disks {
            fsio::remove_if_exists(&d.socket)?;
        }
        let _ = fsio::remove_if_exists(&dir.join(FETCHED_FILE));
        state.pid = spawn(&state, &dir)?;
        fsio::write_atomic(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(&state).expect("state serializes"))?;
        wait_for_sockets(&state, &dir, ctl)?;
        let ids = qemu_ids();
        for d in &state.disks {
            chown_socket(&d.socket, ids)?;
        }
        out.push(state.pid);
    }
    Ok(out)
}

/// After consolidation: stop the server of each quick restore from the
/// vault of `vm` whose exports no disk of `vm` depends on any more, and
/// remove its directory. Returns the servers stopped; a server still
/// needed is left running (with a log line).
pub fn release_served(q: &QemuImg, vm: &Vm, ctl: &Control) -> Result<Vec<Released>> {
    let disks = vm.disks()?;
    let running = vm.is_running()?;
    let mut chains = Vec::new();
    for d in &disks {
        chains.push(crate::engine::live::chain_of(q, running, d, ctl)?);
    }
    let mut out = Vec::new();
    for (dir, state) in served(vm, &disks)? {
        let dir_s = dir.to_string_lossy().into_owned();
        let needed = chains.iter().flatten().any(|f| f.to_string_lossy().contains(&dir_s));
        if needed {
            log::info!(
                "domain {}: a disk is still backed by an export in {}: its server goes on",
                vm.name(),
                dir.display()
            );
            continue;
        }
        let bytes_fetched = stop_server(state.pid, &dir)?;
        // The vault may delete the backup now. A record left (the vault
        // cannot be reached) is found stale by the next delete on this
        // host, its directory being gone.
        if let Err(e) = Vault::open(&state.vault).and_then(|v| v.remove_serving(&state.backup, vm.name())) {
            log::warn!(
                "domain {}: the record of the quick restore of backup {} stays in vault {}: {e}",
                vm.name(),
                state.backup,
                state.vault
            );
        }
        log::info!(
            "domain {}: stopped the vault's NBD server (pid {}) of backup {}; it fetched {bytes_fetched:?} bytes",
            vm.name(),
            state.pid,
            state.backup
        );
        out.push(Released { state, bytes_fetched });
    }
    Ok(out)
}

/// The `knib` program a library caller (the JSON API, C, Java) starts as
/// the vault's NBD server: `given`, or `knib` found on `PATH`.
pub fn server_program(given: Option<&Path>) -> Result<std::path::PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            return Err(KnibError::not_found(format!(
                "the knib program {} (to run the vault's NBD server) does not exist",
                p.display()
            )));
        }
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("knib")).find(|p| p.is_file()).ok_or_else(|| {
        KnibError::not_found(
            "a quick restore from a vault runs knib's NBD server as a process of its own (`knib vault-serve`), and no `knib` program is on PATH: install it or name it (field `server_program`)",
        )
    })
}

/// Start `program vault-serve` for backup `id` of vault `loc` on `dir`,
/// detached (its own process group, its log in `dir`); its pid.
pub fn spawn_server(program: &Path, loc: &str, id: &str, dir: &Path) -> Result<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&log_path)
        .map_err(|e| KnibError::io("cannot open", &log_path, e))?;
    let child = std::process::Command::new(program)
        .arg("vault-serve")
        .arg("--store")
        .arg(loc)
        .arg("--backup")
        .arg(id)
        .arg("--dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: the terminal's signals to the caller do not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| KnibError::io("cannot start", program, e))?;
    Ok(child.id())
}
