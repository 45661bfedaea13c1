//! Fault injection for crash tests (test-only hook, debug builds only).
//!
//! Every durable step of a backup (a rename that publishes or replaces a
//! file, an atomic write, a removal, a write into an image on primary
//! storage, a libvirt call that changes a domain's disks) calls
//! [`durable_step`] right before it is taken. When the environment variable
//! [`CRASH_ENV`] (`KNIB_TEST_CRASH_AT=N`) is set, the process aborts
//! (`std::process::abort`, as a `kill -9` would end it: no unwinding, no
//! cleanup) right before its Nth durable step, so a test can crash a `knib`
//! process between every pair of durable steps by running it with N = 1,
//! 2, ... until it completes. [`CRASH_BEFORE_ENV`]
//! (`KNIB_TEST_CRASH_BEFORE=TEXT`) aborts it instead right before the first
//! durable step whose name contains TEXT: how a test crashes between two
//! given steps without counting those before them. When [`NOTE_ENV`] names
//! a file, the step the process stopped before is written there first (for
//! test messages).
//!
//! Release builds ignore these variables: the hook compiles to nothing.
//!
//! Tests in the same process use the functions (debug builds only too):
//! [`pause_before`] puts time before a durable step or a [`pause_point`]
//! ([`wait_for_pause`] sees it begin), and [`panic_before`] makes one panic
//! (how a test meets a bug on a given thread at a given step).
//!
//! Steps taken on a helper thread (the native merge into a knib base while a
//! plain disk is copied) are not counted, so the numbering is the same from
//! run to run; such a merge never changes what the disk reads, and crashes
//! at every step of the copy it runs beside cover it. A test crashes one
//! with [`CRASH_BEFORE_ENV`] ([`helper_step`]).

/// The environment variable naming the durable step to abort before.
pub const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";

/// The environment variable naming a text: the process aborts right before
/// the first durable step whose name contains it.
pub const CRASH_BEFORE_ENV: &str = "KNIB_TEST_CRASH_BEFORE";

/// The environment variable naming a file where the aborted step is noted.
pub const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";

/// Called right before a durable step named `what`: aborts the process
/// when [`CRASH_ENV`] or [`CRASH_BEFORE_ENV`] asks for a crash at this step
/// (debug builds only).
#[inline]
pub fn durable_step(what: &str) {
    #[cfg(debug_assertions)]
    {
        pause_if_asked(what);
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static AT: OnceLock<Option<u64>> = OnceLock::new();
        static BEFORE: OnceLock<Option<String>> = OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let abort = |n: u64, why: &str| {
            log::error!("{why}: aborting before durable step {n}: {what}");
            if let Some(note) = std::env::var_os(NOTE_ENV) {
                let _ = std::fs::write(note, format!("{n}: {what}\n"));
            }
            std::process::abort();
        };
        let at = *AT.get_or_init(|| std::env::var(CRASH_ENV).ok().and_then(|v| v.trim().parse().ok()));
        let before = BEFORE.get_or_init(|| std::env::var(CRASH_BEFORE_ENV).ok().filter(|v| !v.is_empty()));
        if at.is_none() && before.is_none() {
            return;
        }
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        log::debug!("durable step {n}: {what}");
        if at == Some(n) {
            abort(n, &format!("{CRASH_ENV}={n}"));
        }
        if let Some(b) = before.as_deref().filter(|b| what.contains(b)) {
            abort(n, &format!("{CRASH_BEFORE_ENV}={b}"));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = what;
}

/// Make the first durable step whose name contains `what_contains` wait
/// `pause` before it is taken, once (debug builds only; release builds
/// ignore it): how a test puts time between two steps, such as a time
/// budget that runs out just after a backup is published.
pub fn pause_before(what_contains: &str, pause: std::time::Duration) {
    #[cfg(debug_assertions)]
    pauses().lock().unwrap_or_else(|p| p.into_inner()).push((what_contains.to_string(), pause));
    #[cfg(not(debug_assertions))]
    let _ = (what_contains, pause);
}

/// Make the first durable step or [`pause_point`] whose name contains
/// `what_contains` panic right before it is taken, once (debug builds only;
/// release builds ignore it): how a test sees what a panic (a bug) on the
/// thread that takes that step does to the operation around it.
pub fn panic_before(what_contains: &str) {
    #[cfg(debug_assertions)]
    panics().lock().unwrap_or_else(|p| p.into_inner()).push(what_contains.to_string());
    #[cfg(not(debug_assertions))]
    let _ = what_contains;
}

/// A durable step taken on a helper thread (the native merge into a knib
/// base beside a plain disk's copy): not counted for [`CRASH_ENV`], so the
/// numbering stays the same from run to run, but [`CRASH_BEFORE_ENV`]
/// aborts the process right before it, and [`pause_before`] and
/// [`panic_before`] work as at a [`pause_point`] (debug builds only).
#[inline]
pub fn helper_step(what: &str) {
    #[cfg(debug_assertions)]
    {
        pause_if_asked(what);
        let before = std::env::var(CRASH_BEFORE_ENV).ok().filter(|b| !b.is_empty() && what.contains(b.as_str()));
        if let Some(b) = before {
            log::error!("{CRASH_BEFORE_ENV}={b}: aborting before a helper thread's step: {what}");
            if let Some(note) = std::env::var_os(NOTE_ENV) {
                let _ = std::fs::write(note, format!("helper: {what}\n"));
            }
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = what;
}

/// A point between two steps that is not durable (not counted for
/// [`CRASH_ENV`]), where a test can still put time with [`pause_before`]
/// (debug builds only): how a test lets another operation run in between.
#[inline]
pub fn pause_point(what: &str) {
    #[cfg(debug_assertions)]
    pause_if_asked(what);
    #[cfg(not(debug_assertions))]
    let _ = what;
}

#[cfg(debug_assertions)]
fn pauses() -> &'static std::sync::Mutex<Vec<(String, std::time::Duration)>> {
    static PAUSES: std::sync::OnceLock<std::sync::Mutex<Vec<(String, std::time::Duration)>>> =
        std::sync::OnceLock::new();
    PAUSES.get_or_init(Default::default)
}

#[cfg(debug_assertions)]
fn panics() -> &'static std::sync::Mutex<Vec<String>> {
    static PANICS: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    PANICS.get_or_init(Default::default)
}

/// A pause of [`pause_before`], then a panic of [`panic_before`], when
/// asked for at `what`.
#[cfg(debug_assertions)]
fn pause_if_asked(what: &str) {
    pause_only_if_asked(what);
    let panic = {
        let mut p = panics().lock().unwrap_or_else(|p| p.into_inner());
        p.iter().position(|w| what.contains(w.as_str())).map(|i| p.remove(i))
    };
    if panic.is_some() {
        log::debug!("panicking before step: {what}");
        panic!("a test asked for a panic before step: {what}");
    }
}

#[cfg(debug_assertions)]
fn pause_only_if_asked(what: &str) {
    let found = {
        let mut p = pauses().lock().unwrap_or_else(|p| p.into_inner());
        p.iter().position(|(w, _)| what.contains(w.as_str())).map(|i| p.remove(i).1)
    };
    if let Some(d) = found {
        log::debug!("pausing {d:?} before durable step: {what}");
        let (state, wake) = releases();
        // Under way before anyone is told it began: a release may follow.
        state.lock().unwrap_or_else(|p| p.into_inner()).ongoing.push(what.to_string());
        {
            let (started, wake) = paused();
            started.lock().unwrap_or_else(|p| p.into_inner()).push(what.to_string());
            wake.notify_all();
        }
        // Until the pause ends or a test releases it; then no release is
        // left for it (none ends a later pause).
        let deadline = std::time::Instant::now() + d;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let released = s.released.iter().any(|w| what.contains(w.as_str()));
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if released || left.is_zero() {
                s.released.retain(|w| !what.contains(w.as_str()));
                if let Some(i) = s.ongoing.iter().position(|o| o == what) {
                    s.ongoing.remove(i);
                }
                if released {
                    log::debug!("pause released before durable step: {what}");
                }
                return;
            }
            s = wake.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The pauses under way and the releases asked for them.
#[cfg(debug_assertions)]
#[derive(Default)]
struct Releases {
    ongoing: Vec<String>,
    released: Vec<String>,
}

/// The pauses under way, their releases, and their wake-up.
#[cfg(debug_assertions)]
fn releases() -> &'static (std::sync::Mutex<Releases>, std::sync::Condvar) {
    static RELEASES: std::sync::OnceLock<(std::sync::Mutex<Releases>, std::sync::Condvar)> = std::sync::OnceLock::new();
    RELEASES.get_or_init(Default::default)
}

/// End, now, the pause of [`pause_before`] at the step whose name
/// contains `what_contains` (the one under way, or the one asked for
/// with that name that has not begun yet): how a test holds an operation
/// for as long as it needs (a long pause) and lets it go on as soon as it
/// is done. A release with no such pause does nothing (it never ends a
/// later pause). Debug builds only.
pub fn release_pause(what_contains: &str) {
    #[cfg(debug_assertions)]
    {
        let (state, wake) = releases();
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let pending = || pauses().lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(w, _)| w == what_contains);
        if s.ongoing.iter().any(|o| o.contains(what_contains)) || pending() {
            s.released.push(what_contains.to_string());
            wake.notify_all();
        } else {
            log::debug!("no pause to release at {what_contains}");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = what_contains;
}

/// The steps a pause of [`pause_before`] began at, and their wake-up.
#[cfg(debug_assertions)]
fn paused() -> &'static (std::sync::Mutex<Vec<String>>, std::sync::Condvar) {
    static PAUSED: std::sync::OnceLock<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)> =
        std::sync::OnceLock::new();
    PAUSED.get_or_init(Default::default)
}

/// Wait (at most `timeout`) until a pause of [`pause_before`] has begun
/// at a step whose name contains `what_contains`: how a test acts exactly
/// while an operation waits there. Whether it began (debug builds only;
/// release builds never pause, and say false at once).
pub fn wait_for_pause(what_contains: &str, timeout: std::time::Duration) -> bool {
    #[cfg(debug_assertions)]
    {
        let (started, wake) = paused();
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = started.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if seen.iter().any(|w| w.contains(what_contains)) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            seen = wake.wait_timeout(seen, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = (what_contains, timeout);
        false
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use std::time::Duration;

    /// A pause asked for at `at` (after `before` runs), and whether the
    /// thread stopped there goes on: not by itself, at once once released.
    fn held_then_released(at: &'static str, before: impl FnOnce(), unreleased: &str) {
        before();
        super::pause_before(at, Duration::from_secs(600));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            super::pause_point(at);
            let _ = tx.send(());
        });
        assert!(super::wait_for_pause(at, Duration::from_secs(60)), "no pause");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "{unreleased}");
        super::release_pause(at);
        rx.recv_timeout(Duration::from_secs(60)).expect("the released pause still waits");
    }

    /// A released pause ends at once; a pause not released lasts.
    #[test]
    fn a_released_pause_ends_early() {
        held_then_released("crashpoint test: released", || {}, "the pause ended unreleased");
    }

    /// A release with no pause under way or asked for is dropped: it does
    /// not end a pause asked for later.
    #[test]
    fn a_release_without_a_pause_ends_no_later_pause() {
        let at = "crashpoint test: a stale release";
        held_then_released(at, || super::release_pause(at), "a stale release ended the pause");
    }
}
