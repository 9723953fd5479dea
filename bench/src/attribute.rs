//! Where a data plane's CPU time goes, by request phase, from `perf` samples: the share of
//! a process's samples whose call stack (inlined frames included) passes through each
//! phase's source files. Unlike a comparison of two runs, the shares come from one run of
//! one process, so the machine's noise between runs does not enter them.
//!
//! Needs `perf` (Debian: `linux-perf`) and a data plane built with line tables (the
//! release profile keeps them); stacks are unwound from DWARF call frame information.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// A request phase: a name and the source files (as perf prints them: the file's name
/// only) whose frames are the phase's.
pub(crate) struct Phase {
    pub(crate) name: &'static str,
    pub(crate) files: &'static [(&'static str, Only)],
}

/// Which frames of a file count.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Only {
    All,
    /// Those whose function's name contains this.
    Named(&'static str),
    /// Those whose function's name does not contain this.
    NotNamed(&'static str),
}

/// The phases of a keyed request that `aigw-bench controls` tells apart.
pub(crate) const PHASES: &[Phase] = &[
    Phase {
        name: "metering (usage counters, latency sketches, their hand-off)",
        files: &[
            ("meter.rs", Only::All),
            ("sketch.rs", Only::All),
            // The node's usage outbox and reports (`config/usage.rs`); the response's
            // usage tap (`on_piece`) has the same file name and is counted apart.
            ("usage.rs", Only::NotNamed("on_piece")),
        ],
    },
    // The wire crate's `spend.rs` (caps' and rate limits' leases) counts here.
    Phase {
        name: "spend caps",
        files: &[("spend.rs", Only::All)],
    },
    Phase {
        name: "rate limits",
        files: &[("limit.rs", Only::All), ("limits.rs", Only::All)],
    },
    Phase {
        name: "authentication",
        files: &[("authenticate.rs", Only::All)],
    },
    Phase {
        name: "usage extraction from the answer (every request, keyed or not)",
        files: &[("usage.rs", Only::Named("on_piece"))],
    },
];

/// How many of [`PHASES`], from the first, are metering, caps and limits.
pub(crate) const CONTROLS: usize = 3;

/// A profile's counts.
#[derive(Debug, Default, Clone)]
pub(crate) struct Shares {
    pub(crate) samples: u64,
    /// Samples whose stack reached the thread's start (complete unwinding).
    pub(crate) complete: u64,
    /// Per phase of [`PHASES`].
    pub(crate) phase: Vec<u64>,
    /// Samples in any of the first [`CONTROLS`] phases.
    pub(crate) controls: u64,
}

/// `perf record` of the process `pid`, to `out`, until [`stop`] is called.
pub(crate) fn start(pid: u32, out: &Path) -> anyhow::Result<Child> {
    let child = Command::new("perf")
        .args(["record", "-F", "1999", "--call-graph", "dwarf,32768", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (Debian: apt-get install linux-perf)")?;
    // perf attaches asynchronously: give it a moment before the load starts.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(child)
}

/// Stops a `perf record` started by [`start`] and waits for its file.
pub(crate) fn stop(mut child: Child) -> anyhow::Result<()> {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait()?;
    // perf ends by raising the signal it was stopped with.
    if !status.success() && status.signal() != Some(libc::SIGINT) {
        bail!("perf record ended with {status}");
    }
    Ok(())
}

/// The file and the function of one frame.
fn matches(phase: &Phase, file: &str, function: &str) -> bool {
    phase.files.iter().any(|(f, only)| {
        *f == file
            && match only {
                Only::All => true,
                Only::Named(n) => function.contains(n),
                Only::NotNamed(n) => !function.contains(n),
            }
    })
}

/// Reads `data` (from [`start`]) and counts, per phase, the samples whose stack passes
/// through it.
pub(crate) fn shares(data: &Path) -> anyhow::Result<Shares> {
    let mut child = Command::new("perf")
        .args(["script", "--inline", "-F", "tid,ip,sym,srcline", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf script")?;
    let stdout = child.stdout.take().context("perf script's output")?;
    let mut out = Shares {
        phase: vec![0; PHASES.len()],
        ..Shares::default()
    };
    let mut in_phase = vec![false; PHASES.len()];
    let mut function = String::new();
    let mut started = false;
    let mut complete = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading perf script")?;
        if line.trim().is_empty() {
            if started {
                end_sample(&mut in_phase, &mut complete, &mut out);
                started = false;
            }
            continue;
        }
        started = true;
        if let Some(frame) = line.strip_prefix('\t') {
            // "<address> <function>[ (inlined)]"
            let f = frame.trim_start();
            let f = f.split_once(' ').map_or("", |(_, rest)| rest);
            function = f.trim_end_matches(" (inlined)").to_string();
            complete |= function == "clone3" || function == "clone" || function == "_start";
        } else if let Some(src) = line.strip_prefix("  ") {
            // "<file>:<line>[ (inlined)]": the frame above's place in its source.
            let file = src.split(':').next().unwrap_or("").trim();
            for (phase, hit) in PHASES.iter().zip(in_phase.iter_mut()) {
                *hit |= matches(phase, file, &function);
            }
        }
    }
    if started {
        end_sample(&mut in_phase, &mut complete, &mut out);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("perf script ended with {status}");
    }
    if out.samples == 0 {
        bail!("perf recorded no samples of the data plane");
    }
    Ok(out)
}

/// Counts one sample's phases (and whether its stack was whole), and clears them.
fn end_sample(in_phase: &mut [bool], complete: &mut bool, out: &mut Shares) {
    out.samples += 1;
    out.complete += u64::from(*complete);
    for (n, hit) in out.phase.iter_mut().zip(in_phase.iter()) {
        *n += u64::from(*hit);
    }
    out.controls += u64::from(in_phase[..CONTROLS].iter().any(|h| *h));
    in_phase.iter_mut().for_each(|h| *h = false);
    *complete = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_belongs_to_a_phase_by_file_and_function() {
        let metering = &PHASES[0];
        assert!(matches(metering, "meter.rs", "record"));
        assert!(matches(
            metering,
            "usage.rs",
            "dataplane::config::usage::Outbox::add"
        ));
        assert!(!matches(metering, "usage.rs", "on_piece"));
        assert!(matches(
            &PHASES[4],
            "usage.rs",
            "<UsageTap as ResponseTransform>::on_piece"
        ));
        assert!(!matches(&PHASES[1], "limit.rs", "run"));
    }
}
