//! Memory and CPU of server processes, read from `/proc/<pid>/{status,stat}`.

use std::time::Instant;

/// Samples a fixed set of processes.
#[derive(Debug)]
pub struct Sampler {
    pids: Vec<u32>,
}

/// One sample of every process: (RSS bytes, CPU seconds) summed, and when.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    rss_bytes: u64,
    cpu_secs: f64,
    at: Instant,
}

/// The change between two samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Delta {
    /// RSS at the end, bytes.
    pub rss_bytes: u64,
    /// RSS growth over the interval, bytes (negative when it shrank).
    pub rss_growth_bytes: i64,
    /// CPU time used over the interval, seconds.
    pub cpu_secs: f64,
    /// Wall time of the interval, seconds.
    pub wall_secs: f64,
}

impl Sample {
    /// RSS of the sampled processes together, bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.rss_bytes
    }
}

impl Sampler {
    /// A sampler for `pids` (none: every sample is zero).
    pub fn new(pids: &[u32]) -> Self {
        Sampler {
            pids: pids.to_vec(),
        }
    }

    /// Reads every process now; unreadable processes count as zero.
    pub fn sample(&self) -> Sample {
        let ticks_per_sec = 100.0; // Linux USER_HZ
        let mut sample = Sample {
            rss_bytes: 0,
            cpu_secs: 0.0,
            at: Instant::now(),
        };
        for pid in &self.pids {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let rss_kb = status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0);
                sample.rss_bytes += rss_kb * 1024;
            }
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // Fields after the ")" closing the command name; utime and stime
                // are fields 14 and 15 of the whole line.
                if let Some((_, rest)) = stat.rsplit_once(')') {
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    let ticks: u64 = fields
                        .get(11..13)
                        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
                    sample.cpu_secs += ticks as f64 / ticks_per_sec;
                }
            }
        }
        sample
    }
}

impl Delta {
    /// What changed from `before` to `after`.
    pub fn between(before: &Sample, after: &Sample) -> Delta {
        Delta {
            rss_bytes: after.rss_bytes,
            rss_growth_bytes: after.rss_bytes as i64 - before.rss_bytes as i64,
            cpu_secs: after.cpu_secs - before.cpu_secs,
            wall_secs: after.at.duration_since(before.at).as_secs_f64(),
        }
    }
}
