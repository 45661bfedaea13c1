//! Validation jobs: hashes recorded, then a flipped byte and a broken
//! refcount found and named; a backup deleted while it is validated
//! cancels the validation (it was not found bad).

use super::*;

#[test]
fn a_validation_job_records_hashes_then_fails_a_flipped_byte_and_a_broken_refcount_naming_the_file() {
    let (work, store) = store_with(r#""validation.max_retries": 3, "validation.retry_interval_secs": 0"#);
    let b = backups(&store, work.path(), "vm1", &[4, 2]);
    let (full, inc) = (&b[0].0, &b[1].0);

    // A good backup: done, with the report, and the hashes recorded.
    for m in [full, inc] {
        store.queue_validation(&m.id).unwrap();
    }
    let rec = Arc::new(Recorder::default());
    let summary = run(&store, &rec).unwrap();
    assert_eq!(summary.done.len(), 2, "{summary:?}");
    for j in store.jobs().unwrap() {
        assert_eq!(j.state, JobState::Done);
        let r = j.result.expect("a validation keeps its report");
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["verify"]["files_checked"], 1, "{r}");
    }
    let hash = store.show(&inc.id).unwrap().volumes[0].hash.clone().expect("hash recorded at the first success");
    assert_eq!(
        hash,
        knib_core::engine::hash_files(&[store.volume_file(inc, "root").unwrap()], &Control::new()).unwrap()
    );

    // One flipped byte of data in the incremental backup's file.
    let file = store.volume_file(inc, "root").unwrap();
    flip_byte(&file, first_data_offset(&file) + 1234);
    let job = store.queue_validation(&inc.id).unwrap();
    let summary = run_jobs(&store, &RunOptions::default()).unwrap();
    assert_eq!(summary.failed, vec![job.id.clone()], "{summary:?}");
    let j = store.job(&job.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Failed, 1), "a bad backup is not retried: {j:?}");
    let why = j.last_error.unwrap();
    assert!(
        why.contains(&file.display().to_string()) && why.contains(&format!("differs from the recorded {hash}")),
        "{why}"
    );
    assert_eq!(j.result.unwrap()["ok"], false);

    // The full backup's refcounts broken: qemu-img check finds it and the
    // problem names the file.
    let file = store.volume_file(full, "root").unwrap();
    let header = std::fs::read(&file).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().unwrap());
    let refcount_table = be64(48) as usize;
    let first_block = be64(refcount_table);
    assert!(first_block > 0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&vec![0u8; 4096], first_block).unwrap();
    }
    let job = store.queue_validation(&full.id).unwrap();
    let summary = run_jobs(&store, &RunOptions::default()).unwrap();
    assert_eq!(summary.failed, vec![job.id.clone()], "{summary:?}");
    let why = store.job(&job.id).unwrap().last_error.unwrap();
    assert!(why.contains(&format!("{}: qemu-img check found", file.display())), "{why}");
    // The CLI-level verify says the same.
    let report = store.verify(Some(&full.id), &Control::new()).unwrap().pop().unwrap();
    assert!(
        !report.ok
            && report.problems.iter().any(|p| p.starts_with(&format!("{}: qemu-img check found", file.display()))),
        "{report:?}"
    );
}

#[test]
fn validation_and_compression_jobs_keep_their_own_limits_and_all_finish() {
    let (work, store) = store_with(
        r#""compression.max_concurrent_per_host": 2, "validation.max_concurrent_per_host": 1,
           "compression.rate_limit_mbps": 40"#,
    );
    let mut refs = Vec::new();
    for (i, vm) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        let (m, r) = backups(&store, work.path(), vm, &[6]).pop().unwrap();
        if i < 3 {
            store.queue_compression(&m.id).unwrap();
        } else {
            store.queue_validation(&m.id).unwrap();
        }
        refs.push((m, r));
    }
    let rec = Arc::new(Recorder::default());
    let summary = run(&store, &rec).unwrap();
    assert_eq!(summary.done.len(), 6, "{summary:?}");
    assert!(rec.max_running_of("compress") <= 2, "{}", rec.max_running_of("compress"));
    assert_eq!(rec.max_running_of("validate"), 1);
    assert!(rec.max_running() >= 2, "the kinds ran side by side: {}", rec.max_running());
    for (m, r) in &refs {
        restores_identical(&store, &m.id, r);
    }
}

#[test]
fn deleting_or_compressing_a_backup_while_it_is_validated_is_refused_busy() {
    let (work, store) = store_with(r#""validation.enabled": false"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[2]).pop().unwrap();
    let job = store.queue_validation(&m.id).unwrap();
    // This process as the runner of the job.
    fake_running(&store, &job.id, std::process::id(), &hostname(), 0);
    let e = store.delete(&m.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&format!("validation job {}", job.id)), "{e}");
    // Nor is it compressed under the validation's feet.
    let e = store.compress(&m.id, &Default::default(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(store.show(&m.id).unwrap().compression.is_none());
    restores_identical(&store, &m.id, &reference);
    // Its runner dead: the delete goes ahead.
    fake_running(&store, &job.id, 999_999_999, &hostname(), 0);
    store.delete(&m.id).unwrap();
}

#[test]
fn a_backup_deleted_while_it_is_validated_cancels_the_validation_instead_of_failing_it() {
    let (work, store) = store_with(r#""validation.max_retries": 0"#);
    let (m, _) = backups(&store, work.path(), "vm1", &[2]).pop().unwrap();
    let job = store.queue_validation(&m.id).unwrap();
    // The delete checks that no validation of the backup runs, then waits;
    // the validation starts meanwhile and waits after reading the manifest
    // until the delete has removed the files.
    let pause = Duration::from_secs(3);
    knib_core::crashpoint::pause_before(&format!("delete of {}: no validation of it runs", m.id), pause);
    knib_core::crashpoint::pause_before(&format!("verify of backup {}: manifest read", m.id), pause);
    let summary = std::thread::scope(|s| {
        let deleter = s.spawn(|| store.delete(&m.id));
        std::thread::sleep(Duration::from_millis(500));
        let summary = run_jobs(&store, &RunOptions::default()).unwrap();
        assert_eq!(deleter.join().unwrap().unwrap().expunged, vec![m.id.clone()]);
        summary
    });
    assert!(store.find(&m.id).is_err(), "the backup was deleted");
    assert_eq!(summary.cancelled, vec![job.id.clone()], "{summary:?}");
    let j = store.job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert_eq!(j.last_error.as_deref(), Some(format!("backup {} was deleted", m.id).as_str()), "{j:?}");
}
