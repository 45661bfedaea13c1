//! knib's log records (the `log` crate) forwarded to Java: each record of a
//! `knib*` target calls `io.knib.KnibLog.log(int level, String message)`,
//! which hands it to `java.util.logging`. Records of other crates (the `jni`
//! crate logs its own calls) are not forwarded, so forwarding never logs
//! itself. The thread that logged is attached to the JVM for the call if it
//! was not, and any exception the Java side raised is cleared.
//!
//! The target (the JVM and the class) is set once and never changed, so a
//! record is forwarded holding no lock: a Java log handler may call
//! `Knib.setLogLevel` from inside a forwarded record, or wait on a thread
//! that does, without deadlocking knib (a read lock held across the Java
//! call made such a `setLogLevel` wait for itself).

use std::cell::Cell;
use std::sync::OnceLock;

use jni::objects::{GlobalRef, JClass, JValue};
use jni::{JNIEnv, JavaVM};

/// Where records go: the JVM and the `io.knib.KnibLog` class.
struct Target {
    vm: JavaVM,
    class: GlobalRef,
}

static TARGET: OnceLock<Target> = OnceLock::new();
/// Whether this library's forwarder is the process's logger.
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    /// Set while this thread forwards a record: a record logged meanwhile
    /// is dropped rather than forwarded from inside the forwarding.
    static FORWARDING: Cell<bool> = const { Cell::new(false) };
}

struct Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("knib")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || FORWARDING.with(Cell::get) {
            return;
        }
        let Some(t) = TARGET.get() else { return };
        FORWARDING.with(|f| f.set(true));
        let level = match record.level() {
            log::Level::Error => 1,
            log::Level::Warn => 2,
            log::Level::Info => 3,
            log::Level::Debug => 4,
            log::Level::Trace => 5,
        };
        let text = format!("{}: {}", record.target(), record.args());
        if let Ok(mut env) = t.vm.attach_current_thread() {
            let class = <&JClass>::from(t.class.as_obj());
            let _ = env.with_local_frame(4, |env| -> jni::errors::Result<()> {
                let s = env.new_string(&text)?;
                let r = env.call_static_method(
                    class,
                    "log",
                    "(ILjava/lang/String;)V",
                    &[JValue::Int(level), JValue::Object(&s)],
                );
                if env.exception_check()? {
                    env.exception_clear()?;
                }
                r.map(|_| ())
            });
            // As for progress: no exception of a failed call stays pending.
            if env.exception_check().unwrap_or(false) {
                let _ = env.exception_clear();
            }
        }
        FORWARDING.with(|f| f.set(false));
    }

    fn flush(&self) {}
}

static FORWARDER: Forwarder = Forwarder;

/// Forward records up to `max_level` (0 off, 1 error ... 5 trace) to
/// `io.knib.KnibLog`; called from Java. Returns whether the forwarder is the
/// process's logger (false when another Rust logger got there first).
pub(crate) fn set_level(env: &mut JNIEnv<'_>, max_level: i32) -> jni::errors::Result<bool> {
    let filter = match max_level {
        i32::MIN..=0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if !*INSTALLED.get_or_init(|| log::set_logger(&FORWARDER).is_ok()) {
        return Ok(false);
    }
    if TARGET.get().is_none() {
        let class = env.find_class("io/knib/KnibLog")?;
        let class = env.new_global_ref(&class)?;
        // Two first calls at once: one target is kept, the other dropped.
        let _ = TARGET.set(Target { vm: env.get_java_vm()?, class });
    }
    log::set_max_level(filter);
    Ok(true)
}
