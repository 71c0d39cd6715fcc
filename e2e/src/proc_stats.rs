//! Figures of a running process read from `/proc/<pid>`: CPU time, memory, open file descriptors. Each reads 0 once
//! the process is gone (its `/proc` entry vanishes when it is reaped).

/// User plus system CPU time so far, in seconds (from `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is the first, utime the 12th, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB; 0 if absent.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// Resident set size now (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// Peak resident set size (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// How many file descriptors it holds now (`/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_figures_and_a_missing_one_reads_zero() {
        let me = std::process::id();
        assert!(rss_bytes(me) > 0 && peak_rss_bytes(me) >= rss_bytes(me));
        assert!(open_fds(me) > 0);
        assert!(cpu_seconds(me) >= 0.0);
        // PIDs never reach u32::MAX (pid_max is at most 2^22).
        assert_eq!((cpu_seconds(u32::MAX), rss_bytes(u32::MAX), open_fds(u32::MAX)), (0.0, 0, 0));
    }
}
