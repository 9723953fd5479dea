//! The numeric rules (phones, cards, SSNs, IBANs, IPv4) matched by one DFA, walked from each
//! possible start in the ranges [`gate::starts`](super::gate::starts) finds.
//!
//! Hyperscan compiles these rules, with start of match, into one NFA each; in a run of
//! digits every one of them is active, and together they cost about 9 ns a byte there, most
//! of a prompt's scan. Their expressions are small and bounded, so one deterministic
//! automaton holds them all (a few tens of KiB, built in milliseconds, shared read-only by
//! every core like the Hyperscan databases). From each start where a rule can begin (a
//! digit, capital or `(` after a non-word byte, or a `+`) it runs anchored until no rule can
//! continue, which takes at most the widest rule's width; every match state on the way is a
//! match end. A rule's hit at an end is kept only from the first (leftmost) start that
//! reaches it: exactly the hits Hyperscan reports with `HS_FLAG_SOM_LEFTMOST`, as the
//! property test against `Scanner::without_gate` checks.

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::{start, syntax};
use regex_automata::{Anchored, MatchKind};
use rustc_hash::FxHashSet;

use super::scanner::PatternError;
use super::validate::is_word;

/// The numeric rules' automaton; pattern `i` is rule `ids[i]`.
pub(crate) struct Numeric {
    dfa: dense::DFA<Vec<u32>>,
    ids: Vec<u32>,
    /// The anchored start state after each byte (index 256: at the text's start).
    starts: Vec<StateID>,
}

impl std::fmt::Debug for Numeric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Numeric")
            .field("rules", &self.ids)
            .field("bytes", &self.dfa.memory_usage())
            .finish()
    }
}

/// Where some numeric rule can begin: every one starts with `\b` and a digit or capital,
/// with `(`, or with `+`.
fn can_start(text: &[u8], p: usize) -> bool {
    let b = text[p];
    match b {
        b'(' | b'+' => true,
        b'0'..=b'9' | b'A'..=b'Z' => p == 0 || !is_word(text[p - 1]),
        _ => false,
    }
}

impl Numeric {
    /// One automaton for `(rule id, expression)` pairs, with Hyperscan's reading of them:
    /// bytes, not characters, and an ASCII `\b`.
    pub(crate) fn new<'e>(
        rules: impl Iterator<Item = (u32, &'e str)>,
    ) -> Result<Self, PatternError> {
        let (ids, exprs): (Vec<u32>, Vec<&str>) = rules.unzip();
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored),
            )
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().utf8(false))
            .build_many(&exprs)
            .map_err(|e| PatternError::Database(format!("numeric rules: {e}")))?;
        let starts = (0..=256u16)
            .map(|b| {
                let config = start::Config::new()
                    .anchored(Anchored::Yes)
                    .look_behind(u8::try_from(b).ok());
                dfa.start_state(&config)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| PatternError::Database(format!("numeric rules: {e}")))?;
        Ok(Self { dfa, ids, starts })
    }

    /// Appends to `raw` every hit `(rule id, leftmost start, end)` of a match starting in
    /// one of `ranges` (sorted). `seen` is scratch space.
    pub(crate) fn hits(
        &self,
        text: &[u8],
        ranges: &[(usize, usize)],
        seen: &mut FxHashSet<(u32, usize)>,
        raw: &mut Vec<(u32, usize, usize)>,
    ) {
        seen.clear();
        let dfa = &self.dfa;
        for &(from, to) in ranges {
            for p in from..to {
                if !can_start(text, p) {
                    continue;
                }
                let mut state = self.starts[p.checked_sub(1).map_or(256, |i| usize::from(text[i]))];
                let mut record = |state, end: usize| {
                    for k in 0..dfa.match_len(state) {
                        let id = self.ids[dfa.match_pattern(state, k).as_usize()];
                        if seen.insert((id, end)) {
                            raw.push((id, p, end));
                        }
                    }
                };
                let mut at = p;
                let live = loop {
                    let Some(&b) = text.get(at) else {
                        break true;
                    };
                    state = dfa.next_state(state, b);
                    if dfa.is_special_state(state) {
                        if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
                            break false;
                        }
                        // A match state is entered one byte after the match ends.
                        if dfa.is_match_state(state) {
                            record(state, at);
                        }
                    }
                    at += 1;
                };
                if live {
                    state = dfa.next_eoi_state(state);
                    if dfa.is_match_state(state) {
                        record(state, text.len());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pii::patterns::{builtins, numeric};

    fn automaton() -> (Numeric, Vec<&'static str>) {
        let rules = builtins();
        let names = rules.iter().map(|r| r.name).collect();
        let n = Numeric::new(
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| numeric(r.name))
                .map(|(i, r)| (i as u32, r.expr.as_ref())),
        )
        .unwrap();
        (n, names)
    }

    #[test]
    fn the_automaton_is_small() {
        let (n, _) = automaton();
        assert_eq!(n.ids.len(), 16);
        assert!(n.dfa.memory_usage() < 512 * 1024, "{n:?}");
    }

    #[test]
    fn hits_carry_the_leftmost_start_of_each_end() {
        let (n, names) = automaton();
        let text = b"call 1 (415) 555-2671 now";
        let mut raw = Vec::new();
        n.hits(
            text,
            &[(0, text.len())],
            &mut FxHashSet::default(),
            &mut raw,
        );
        let named: Vec<(&str, &[u8])> = raw
            .iter()
            .map(|&(id, s, e)| (names[id as usize], &text[s..e]))
            .collect();
        // Ends at "2671" from "1 (", not from "(": the leftmost start wins.
        assert!(
            named.contains(&("phone_us_paren", &b"1 (415) 555-2671"[..])),
            "{named:?}"
        );
        assert!(
            !named.contains(&("phone_us_paren", &b"(415) 555-2671"[..])),
            "{named:?}"
        );
        // No start outside the ranges given.
        raw.clear();
        n.hits(text, &[(0, 5)], &mut FxHashSet::default(), &mut raw);
        assert!(raw.is_empty(), "{raw:?}");
    }
}
