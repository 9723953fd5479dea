//! Precision and recall of the built-in detectors on the labelled corpus that
//! `dataplane/pii-corpus/generate.py` builds from the labelling rules (`PII.md`): realistic
//! prompts in English, German and French with planted entities and hard negatives.
//!
//! Two parts, from two seeds: a development part, and a held-out part that is generated
//! here and never used to tune the detectors. The targets are the held-out part's:
//! recall ≥ 0.99 and precision ≥ 0.98 for the checksum-validated entities (cards, IBANs),
//! ≥ 0.95 for the rest. One command prints both tables:
//!
//! ```sh
//! cargo test -p dataplane --test pii_corpus -- --nocapture
//! ```
//!
//! A finding counts as a true positive only when its entity and its span are exactly the
//! labelled ones; any other finding is a false positive of its entity, and any labelled
//! span not found exactly is a false negative.
//!
//! What this measures: that the detectors do what `PII.md` says on realistic text. The
//! generator plants only shapes `PII.md` decides (it leaves out what the rules leave open),
//! and it was checked against a Python reading of the same rules, so it cannot tell how the
//! rules themselves fare on real traffic. The held-out seed was never used while the
//! generator or the detectors were written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use dataplane::pii::{Entity, Scanner};
use serde_json::Value;

/// The development part: tune on this one.
const DEV_SEED: u64 = 1;
/// The held-out part: never tuned on.
const HELD_OUT_SEED: u64 = 20_261_205;
const DOCUMENTS: u64 = 3000;

#[derive(Default, Clone, Copy)]
struct Score {
    tp: u32,
    fp: u32,
    fn_: u32,
}

impl Score {
    fn precision(self) -> f64 {
        f64::from(self.tp) / f64::from((self.tp + self.fp).max(1))
    }
    fn recall(self) -> f64 {
        f64::from(self.tp) / f64::from((self.tp + self.fn_).max(1))
    }
}

fn entity(name: &str) -> Entity {
    Entity::from_name(name)
        .unwrap_or_else(|| panic!("the corpus labels an unknown entity {name:?}"))
}

fn generate(seed: u64, dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pii-corpus/generate.py");
    let out = dir.join(format!("corpus-{seed}.jsonl"));
    let status = Command::new("python3")
        .arg(&script)
        .args([
            "--seed",
            &seed.to_string(),
            "--count",
            &DOCUMENTS.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("python3 runs the corpus generator");
    assert!(status.success(), "the generator failed");
    out
}

/// Scores per entity, and the first few mistakes (for reading, not for tuning).
fn evaluate(scanner: &Scanner, corpus: &Path) -> (BTreeMap<Entity, Score>, String, usize) {
    let mut scratch = scanner.scratch().unwrap();
    let mut scores: BTreeMap<Entity, Score> = BTreeMap::new();
    let mut mistakes = String::new();
    let mut shown = 0;
    let mut documents = 0;
    for line in std::fs::read_to_string(corpus).unwrap().lines() {
        documents += 1;
        let doc: Value = serde_json::from_str(line).unwrap();
        let text = doc["text"].as_str().unwrap();
        let labels: Vec<(usize, usize, Entity)> = doc["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["start"].as_u64().unwrap() as usize,
                    s["end"].as_u64().unwrap() as usize,
                    entity(s["entity"].as_str().unwrap()),
                )
            })
            .collect();
        let found = scanner.find(&mut scratch, text.as_bytes()).unwrap();
        let mut note = |what: &str, e: Entity, start: usize, end: usize| {
            if shown < 40 {
                shown += 1;
                let _ = writeln!(
                    mistakes,
                    "{what} {:<6} {:?}",
                    e.tag(),
                    String::from_utf8_lossy(&text.as_bytes()[start..end])
                );
            }
        };
        for &(start, end, e) in &labels {
            let s = scores.entry(e).or_default();
            if found
                .iter()
                .any(|f| f.entity == e && f.start == start && f.end == end)
            {
                s.tp += 1;
            } else {
                s.fn_ += 1;
                note("missed", e, start, end);
            }
        }
        for f in &found {
            if !labels
                .iter()
                .any(|&(start, end, e)| f.entity == e && f.start == start && f.end == end)
            {
                scores.entry(f.entity).or_default().fp += 1;
                note("false ", f.entity, f.start, f.end);
            }
        }
    }
    (scores, mistakes, documents)
}

fn table(part: &str, documents: usize, scores: &BTreeMap<Entity, Score>) -> String {
    let mut t = format!(
        "{part} ({documents} documents)\n{:<8} {:>6} {:>5} {:>5} {:>9} {:>7}\n",
        "entity", "tp", "fp", "fn", "precision", "recall"
    );
    for (e, s) in scores {
        let _ = writeln!(
            t,
            "{:<8} {:>6} {:>5} {:>5} {:>9.4} {:>7.4}",
            e.tag(),
            s.tp,
            s.fp,
            s.fn_,
            s.precision(),
            s.recall()
        );
    }
    t
}

#[test]
fn precision_and_recall_on_the_generated_corpus() {
    let scanner = Scanner::new().expect("built-in patterns compile");
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (part, seed) in [("development", DEV_SEED), ("held-out", HELD_OUT_SEED)] {
        let corpus = generate(seed, dir.path());
        let (scores, mistakes, documents) = evaluate(&scanner, &corpus);
        println!("{}", table(part, documents, &scores));
        if !mistakes.is_empty() {
            println!("first mistakes ({part}):\n{mistakes}");
        }
        assert!(
            documents as u64 == DOCUMENTS,
            "{part}: {documents} documents"
        );
        for e in [
            Entity::Email,
            Entity::Phone,
            Entity::Card,
            Entity::Ssn,
            Entity::Iban,
            Entity::Ip,
            Entity::Secret,
        ] {
            assert!(
                scores.get(&e).is_some_and(|s| s.tp + s.fn_ > 0),
                "{part}: no {e:?} in the corpus"
            );
        }
        if part != "held-out" {
            continue;
        }
        for (e, s) in &scores {
            let (p_min, r_min) = match e {
                Entity::Card | Entity::Iban => (0.98, 0.99),
                _ => (0.95, 0.95),
            };
            if s.precision() < p_min || s.recall() < r_min {
                failures.push(format!(
                    "{e:?}: precision {:.4} (target {p_min}), recall {:.4} (target {r_min})",
                    s.precision(),
                    s.recall()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "held-out part below target: {failures:#?}"
    );
}
