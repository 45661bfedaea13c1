//! How the benchmark measures: each timed step runs as a child process
//! (under `/usr/bin/time`, for its peak RSS) reaped with `wait4`, which
//! gives its CPU time (user + system); each row records the machine's load average and, from
//! `/proc/stat`, the CPU stolen by the hypervisor and the CPU other
//! processes used meanwhile, and is marked noisy when the machine was busy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::json;

/// One timed step: a program and its arguments.
pub(crate) type Cmd = Vec<String>;

pub(crate) fn cmd(parts: &[&str]) -> Cmd {
    parts.iter().map(|s| s.to_string()).collect()
}

/// What one child process used.
#[derive(Default, Clone, Copy)]
pub(crate) struct Usage {
    /// User + system CPU seconds.
    pub(crate) cpu: f64,
    /// Peak resident set, KiB.
    pub(crate) rss_kib: u64,
}

fn secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Run `c` (its output to /dev/null) and return what it used; panics when
/// it fails.
///
/// It runs under `/usr/bin/time -f %M`, which reports the `ru_maxrss` of
/// its child: a process started by the benchmark itself would inherit the
/// benchmark's own peak RSS as its floor (Linux records the RSS of the
/// address space replaced at `exec`), `/usr/bin/time`'s is about 2 MiB.
/// The CPU time is from `wait4` of `/usr/bin/time`: its child's user and
/// system time, which it reaps, plus its own (about a millisecond).
pub(crate) fn run_child(c: &Cmd) -> Usage {
    let tfile = std::env::temp_dir().join(format!("knib-bench-time-{}", std::process::id()));
    let child = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&tfile)
        .args(c)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("/usr/bin/time does not run (install the `time` package): {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child, with valid pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "wait4 of {c:?}: {e}");
    }
    // The child is reaped: `child` is dropped without a wait (std neither
    // waits nor kills on drop).
    drop(child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{c:?} failed (wait status {status})");
    let rss_kib =
        std::fs::read_to_string(&tfile).unwrap_or_default().trim().lines().last().unwrap_or("0").parse().unwrap_or(0);
    let _ = std::fs::remove_file(&tfile);
    Usage { cpu: secs(ru.ru_utime) + secs(ru.ru_stime), rss_kib }
}

/// One timed run: wall seconds, CPU seconds of all its processes, peak RSS
/// of the largest.
#[derive(Default, Clone, Copy)]
pub(crate) struct RunUsage {
    pub(crate) secs: f64,
    pub(crate) cpu: f64,
    pub(crate) rss_kib: u64,
}

/// Run the steps of one run, then fsync `sync` (`sync FILE`: qemu-img and
/// cp leave their output in the page cache; knib fsyncs itself), or with
/// `whole_fs` the file systems they are on (`sync -f`).
pub(crate) fn timed(steps: &[Cmd], sync: &[&Path], whole_fs: bool) -> RunUsage {
    let start = Instant::now();
    let mut u = RunUsage::default();
    let sync_cmd = (!sync.is_empty()).then(|| {
        let mut c = if whole_fs { cmd(&["sync", "-f"]) } else { cmd(&["sync"]) };
        c.extend(sync.iter().map(|p| p.to_str().expect("UTF-8 path").to_string()));
        c
    });
    for s in steps.iter().chain(sync_cmd.as_ref()) {
        let r = run_child(s);
        u.cpu += r.cpu;
        u.rss_kib = u.rss_kib.max(r.rss_kib);
    }
    u.secs = start.elapsed().as_secs_f64();
    u
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// A tool's result in a row.
#[derive(Default, Clone, Copy)]
pub(crate) struct Measured {
    /// Median wall seconds.
    pub(crate) secs: f64,
    /// Median CPU seconds (user + system of its processes).
    pub(crate) cpu: f64,
    /// Largest peak RSS of any of its processes, KiB.
    pub(crate) rss_kib: u64,
    pub(crate) out_bytes: u64,
}

/// The machine's state: cores, 1-minute load average, CPU counters.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The `cpu` line of /proc/stat, in clock ticks: (busy, steal, total).
/// Busy is user + nice + system + irq + softirq (guest time is inside
/// user); total adds idle, iowait and steal.
fn cpu_ticks() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| l.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    if v.len() < 8 {
        return (0, 0, 0);
    }
    let (user, nice, system, idle, iowait, irq, softirq, steal) = (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
    let busy = user + nice + system + irq + softirq;
    (busy, steal, busy + idle + iowait + steal)
}

/// CPU seconds this process and its reaped children have used.
fn own_cpu() -> f64 {
    let mut t = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage fills a zeroed rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            t += secs(ru.ru_utime) + secs(ru.ru_stime);
        }
    }
    t
}

/// A row is noisy when more than this share of the time of the CPUs was
/// stolen by the hypervisor...
pub(crate) const STEAL_NOISY_PCT: f64 = 2.0;
/// ...or other processes kept more than this many cores per core busy on
/// average (0.25: half a core of a 2-core machine).
pub(crate) const OTHERS_NOISY_PER_CORE: f64 = 0.25;
/// The run is noisy when the load average per core exceeds this at its start.
pub(crate) const LOAD_NOISY_PER_CORE: f64 = 0.5;

/// The machine while a row's timed runs ran (its untimed setups, which
/// start domains and copy disks, are not counted).
#[derive(Default, Clone, Copy)]
pub(crate) struct RowEnv {
    pub(crate) load_start: f64,
    pub(crate) load_end: f64,
    /// Share of the CPUs' time stolen, %.
    pub(crate) steal_pct: f64,
    /// Cores kept busy by other processes (the machine's busy time less
    /// the benchmark's own and its children's, and less the row's
    /// servers'), on average.
    pub(crate) others_cores: f64,
    /// Cores kept busy by the servers the row drives (QEMU and libvirtd in
    /// the live rows, Ceph's daemons in the vault rows), on average: the
    /// work of the row, not noise; shown apart.
    pub(crate) server_cores: f64,
    pub(crate) noisy: bool,
}

impl RowEnv {
    pub(crate) fn why(&self) -> String {
        let servers = if self.server_cores > 0.0 {
            format!(" (the row's servers {:.2})", self.server_cores)
        } else {
            String::new()
        };
        format!(
            "load {:.2} -> {:.2}, steal {:.1}%, others {:.2} cores{servers}",
            self.load_start, self.load_end, self.steal_pct, self.others_cores
        )
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "load_start": self.load_start,
            "load_end": self.load_end,
            "steal_pct": self.steal_pct,
            "others_cores": self.others_cores,
            "server_cores": self.server_cores,
            "noisy": self.noisy,
        })
    }
}

/// CPU seconds (user + system, every thread) of the running processes
/// whose name (`comm`) is one of `names`, by pid.
fn server_cpu(names: &[&str]) -> Vec<(u32, f64)> {
    if names.is_empty() {
        return vec![];
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![] };
    let mut out = vec![];
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ...: comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !names.contains(&&stat[open + 1..close]) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the comm: state is field 3, utime 14 and stime 15.
        if let (Some(u), Some(s)) =
            (f.get(11).and_then(|v| v.parse::<u64>().ok()), f.get(12).and_then(|v| v.parse::<u64>().ok()))
        {
            out.push((pid, (u + s) as f64 / hz));
        }
    }
    out
}

/// What a span of time used: the machine's busy and stolen time, the
/// benchmark's own (and its children's) and its servers'.
#[derive(Default, Clone, Copy)]
struct Span {
    busy_secs: f64,
    steal_ticks: u64,
    total_ticks: u64,
    own_secs: f64,
    server_secs: f64,
    elapsed: f64,
}

/// Watches the machine over one timed run: from [`Watch::start`] to
/// [`Watch::end`].
struct Watch<'a> {
    servers: &'a [&'a str],
    ticks: (u64, u64, u64),
    own: f64,
    server: Vec<(u32, f64)>,
    at: Instant,
}

impl<'a> Watch<'a> {
    fn start(servers: &'a [&'a str]) -> Self {
        Watch { servers, ticks: cpu_ticks(), own: own_cpu(), server: server_cpu(servers), at: Instant::now() }
    }

    fn end(&self) -> Span {
        let (busy, steal, total) = cpu_ticks();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // A server's CPU over the span: of the processes there at both ends
        // (a domain started or stopped meanwhile is the tool's work, which
        // setups do untimed).
        let server_secs = server_cpu(self.servers)
            .iter()
            .filter_map(|(pid, t)| self.server.iter().find(|(p, _)| p == pid).map(|(_, t0)| (t - t0).max(0.0)))
            .sum();
        Span {
            busy_secs: busy.saturating_sub(self.ticks.0) as f64 / hz,
            steal_ticks: steal.saturating_sub(self.ticks.1),
            total_ticks: total.saturating_sub(self.ticks.2),
            own_secs: own_cpu() - self.own,
            server_secs,
            elapsed: self.at.elapsed().as_secs_f64(),
        }
    }
}

/// The machine over a row's timed runs.
struct RowWatch {
    load_start: Option<f64>,
    sum: Span,
}

impl RowWatch {
    fn new() -> Self {
        RowWatch { load_start: None, sum: Span::default() }
    }

    fn add(&mut self, load_start: f64, s: Span) {
        self.load_start.get_or_insert(load_start);
        let t = &mut self.sum;
        t.busy_secs += s.busy_secs;
        t.steal_ticks += s.steal_ticks;
        t.total_ticks += s.total_ticks;
        t.own_secs += s.own_secs;
        t.server_secs += s.server_secs;
        t.elapsed += s.elapsed;
    }

    fn env(&self) -> RowEnv {
        let t = &self.sum;
        let elapsed = t.elapsed.max(1e-3);
        let steal_pct = t.steal_ticks as f64 / t.total_ticks.max(1) as f64 * 100.0;
        let server_cores = t.server_secs / elapsed;
        let others_cores = ((t.busy_secs - t.own_secs - t.server_secs) / elapsed).max(0.0);
        let c = cores() as f64;
        RowEnv {
            load_start: self.load_start.unwrap_or_else(load1),
            load_end: load1(),
            steal_pct,
            others_cores,
            server_cores,
            noisy: steal_pct > STEAL_NOISY_PCT || others_cores > OTHERS_NOISY_PER_CORE * c,
        }
    }
}

/// One tool of a row.
pub(crate) struct Tool<'a> {
    pub(crate) name: &'a str,
    pub(crate) steps: Vec<Cmd>,
    /// Its output (measured, and fsynced after the steps, whatever the
    /// tool: a no-op for knib, which fsyncs its outputs itself). A
    /// directory's output is what the run added to the files in it.
    pub(crate) out: PathBuf,
    /// Sync the output's whole file system (`sync -f`): for tools that
    /// write files of their own naming into a directory.
    pub(crate) sync_fs: bool,
    /// Other files fsynced after the steps (a base a merge wrote into).
    pub(crate) sync_also: Vec<PathBuf>,
    /// Untimed preparation before each run, given the run's number (the
    /// tools of one run get the same number, hence the same data).
    pub(crate) setup: Option<&'a dyn Fn(usize)>,
}

impl<'a> Tool<'a> {
    pub(crate) fn new(name: &'a str, steps: Vec<Cmd>, out: &Path) -> Self {
        Tool { name, steps, out: out.to_path_buf(), sync_also: vec![], setup: None, sync_fs: false }
    }

    pub(crate) fn setup(mut self, f: &'a dyn Fn(usize)) -> Self {
        self.setup = Some(f);
        self
    }

    pub(crate) fn sync_fs(mut self) -> Self {
        self.sync_fs = true;
        self
    }

    pub(crate) fn sync_also(mut self, s: Vec<PathBuf>) -> Self {
        self.sync_also = s;
        self
    }
}

/// The length of a file, or of all files under a directory (0 when missing).
fn tree_size(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()).map(|e| tree_size(&e.path())).sum()).unwrap_or(0)
        }
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// Alternate the tools `runs` times (run after run, every tool once per
/// run, in turn), and report each tool's medians and the machine's state
/// during the row.
pub(crate) fn compare(runs: usize, tools: &[Tool<'_>]) -> (Vec<Measured>, RowEnv) {
    compare_serving(runs, tools, &[])
}

/// [`compare`] for a row that drives servers: the processes named
/// `servers`, whose CPU is the row's work, shown apart from other
/// processes' ([`RowEnv::server_cores`]).
pub(crate) fn compare_serving(runs: usize, tools: &[Tool<'_>], servers: &[&str]) -> (Vec<Measured>, RowEnv) {
    let mut watch = RowWatch::new();
    let mut times = vec![Vec::new(); tools.len()];
    let mut cpus = vec![Vec::new(); tools.len()];
    let mut rss = vec![0u64; tools.len()];
    let mut size = vec![0u64; tools.len()];
    for run in 0..runs {
        for (t, tool) in tools.iter().enumerate() {
            let _ = std::fs::remove_file(&tool.out);
            if let Some(setup) = tool.setup {
                setup(run);
            }
            let mut sync: Vec<&Path> = vec![&tool.out];
            sync.extend(tool.sync_also.iter().map(|p| p.as_path()));
            let before = tree_size(&tool.out);
            let load = load1();
            let w = Watch::start(servers);
            let u = timed(&tool.steps, &sync, tool.sync_fs);
            watch.add(load, w.end());
            eprintln!("  {}: {:.2} s, {:.2} CPU s, {} KiB", tool.name, u.secs, u.cpu, u.rss_kib);
            times[t].push(u.secs);
            cpus[t].push(u.cpu);
            rss[t] = rss[t].max(u.rss_kib);
            size[t] = tree_size(&tool.out).saturating_sub(before);
        }
    }
    let env = watch.env();
    if env.noisy {
        eprintln!("  noisy: {}", env.why());
    }
    let m = (0..tools.len())
        .map(|t| Measured {
            secs: median(&mut times[t]),
            cpu: median(&mut cpus[t]),
            rss_kib: rss[t],
            out_bytes: size[t],
        })
        .collect();
    (m, env)
}

/// The kernel's free page reporting, when this machine is a VM whose
/// balloon device hands freed memory back to its host; `None` when not.
///
/// A virtio balloon with `VIRTIO_BALLOON_F_REPORTING` (feature bit 5)
/// reports free blocks of `page_reporting_order` and above to the host,
/// which drops them; the next process to allocate such a page takes a
/// fault on the host. A tool that frees memory (a deleted output, pages
/// dropped after writeback) thus slows down whichever tool comes next: on
/// the benchmark's host the same delta copy took 0.13 s or 0.30 s by that
/// alone (docs/performance.md, "An eleventh run"). Reporting is off when
/// the order is above the largest the buddy allocator keeps (the columns
/// of `/proc/buddyinfo`).
pub(crate) fn free_page_reporting() -> Option<PageReporting> {
    const ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
    let order: u32 = std::fs::read_to_string(ORDER).ok()?.trim().parse().ok()?;
    let buddy = std::fs::read_to_string("/proc/buddyinfo").ok()?;
    // "Node 0, zone DMA  n0 n1 ... nMAX": four words before the counts.
    let max_order = buddy.lines().next()?.split_whitespace().count().checked_sub(5)? as u32;
    let balloon = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon").ok()?.flatten().any(|e| {
        let features = std::fs::read_to_string(e.path().join("features")).unwrap_or_default();
        features.as_bytes().get(5) == Some(&b'1')
    });
    (balloon && order <= max_order).then_some(PageReporting { order, off: max_order + 1 })
}

/// Free page reporting as found: its order, and the order that turns it off.
#[derive(Clone, Copy)]
pub(crate) struct PageReporting {
    pub(crate) order: u32,
    pub(crate) off: u32,
}
