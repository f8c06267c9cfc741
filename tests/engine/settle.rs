//! Sources still being written when a job plans: the pin waits for the file to settle.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Env, bytes, json};

/// A file rewritten in place every millisecond never settles: the job is refused
/// `source_changed` "still being written" at planning, before it reads a byte, within a bounded
/// time, and nothing is published.
#[test]
fn a_source_that_never_settles_is_refused_as_still_being_written() {
    let env = Env::new("    fsync: false\n");
    let data = bytes(31, 64 << 10);
    let src = env.data("busy", &data);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            let mut i = 0u8;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&[i], 0).unwrap();
                i = i.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let started = Instant::now();
    let r = env.fails(
        "m.json",
        &json(serde_json::json!({"output": "o", "sources": ["busy"]})),
        "source_changed",
        "o",
    );
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("still being written"), "{message}");
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
}
