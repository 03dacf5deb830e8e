//! Process measurements from /proc (Linux).

/// CPU time (user and system) of this process's children that have ended and been waited
/// for, in ms: taken before a child starts and after it is waited for, the difference is that
/// child's whole CPU time, which samples of /proc miss the last moments of.
#[allow(unsafe_code)]
pub fn ended_children_cpu_ms() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given, which is zeroed and large enough.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: filled in by the successful call above (and zeroed before it).
    let usage = unsafe { usage.assume_init() };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    Some(ms(usage.ru_utime) + ms(usage.ru_stime))
}

/// Peak resident set size of a process.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process has used so far, in ms (`pid` may be "self").
pub fn cpu_ms_of(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10)
}

/// CPU used by the PostgreSQL processes serving one database (its backends and autovacuum
/// workers, found by the database name in their process titles), when the server runs on
/// this machine. Backends come and go, so it is sampled: `sample` records each process's
/// latest reading, and `used_ms` sums what each used after it was first seen (a process
/// first seen mid-run counts from its start). Finding processes reads every process title,
/// so `sample` does that only every tenth call and otherwise reads the ones it knows.
pub struct DatabaseCpu {
    title: String,
    first: std::collections::HashMap<u32, u64>,
    last: std::collections::HashMap<u32, u64>,
    samples: u64,
}

impl DatabaseCpu {
    /// Starts tallying for `database`; processes already running count from now.
    pub fn start(database: &str) -> DatabaseCpu {
        let mut tally = DatabaseCpu {
            title: format!(" {database} "),
            first: Default::default(),
            last: Default::default(),
            samples: 0,
        };
        for (pid, ms) in tally.serving() {
            tally.first.insert(pid, ms);
        }
        tally
    }

    pub fn sample(&mut self) {
        self.samples += 1;
        if self.samples % 10 == 1 {
            for (pid, ms) in self.serving() {
                self.first.entry(pid).or_insert(0);
                self.last.insert(pid, ms);
            }
        } else {
            for (pid, ms) in self.last.iter_mut() {
                if let Some(now) = cpu_ms_of(&pid.to_string()) {
                    *ms = now;
                }
            }
        }
    }

    pub fn used_ms(&self) -> u64 {
        self.last
            .iter()
            .map(|(pid, ms)| ms.saturating_sub(self.first.get(pid).copied().unwrap_or(0)))
            .sum()
    }

    fn serving(&self) -> Vec<(u32, u64)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|title| {
                    let title = String::from_utf8_lossy(&title);
                    title.starts_with("postgres:") && title.contains(&self.title)
                })
            })
            .filter_map(|pid| Some((pid, cpu_ms_of(&pid.to_string())?)))
            .collect()
    }
}
