//! `ordering`: what per-key ordering costs (issue 3 asks that it be a small fraction
//! of throughput). Each round drains the same number of rows three times, in the
//! three layouts of `load.rs`, in an order that rotates from round to round (this
//! machine drifts within minutes, so only interleaved runs compare):
//!
//! - `grouped`: a call's three rows next to each other, keyed: each claim probes the
//!   later rows of the calls whose first row it takes, and finds them blocked;
//! - `spread`: the same keys, a call's rows a third of the backlog apart: one probe
//!   per row, as when calls end at different times;
//! - `unordered`: no keys, no head-of-key probe: what the same relay does without
//!   ordering (`ordering.enabled = false`).
//!
//! The cost is `1 − ordered ÷ unordered` on the medians, and per round. Every drain
//! also checks that no row reached the sink while an earlier row of its key was
//! unanswered (`sink::out_of_order`).

use super::drain::{self, Figures};
use super::Ctx;
use clap::ValueEnum;

use crate::load::Layout;
use crate::report::{thousands, Report};

const LAYOUTS: [Layout; 3] = [Layout::Grouped, Layout::Spread, Layout::Unordered];

/// One round: a drain in each layout.
#[derive(Debug, Clone)]
pub struct Round {
    pub grouped: Figures,
    pub spread: Figures,
    pub unordered: Figures,
}

/// Round `round` (from 1): three drains of `rows`, starting with a different layout
/// each round.
pub async fn run(ctx: &Ctx, rows: u64, round: u32, report: &mut Report) -> anyhow::Result<Round> {
    let mut figures: [Option<Figures>; 3] = [None, None, None];
    let first = (round.saturating_sub(1) as usize) % LAYOUTS.len();
    for step in 0..LAYOUTS.len() {
        let at = (first + step) % LAYOUTS.len();
        let layout = LAYOUTS[at];
        let name = layout
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        let label = format!("ordering ({name})");
        let f = drain::run(ctx, rows, layout, report).await?;
        println!(
            "{label}: {} rows/s, PostgreSQL CPU {}",
            thousands(f.rows_per_s),
            cpu(f.pg_cpu_per_10k)
        );
        figures[at] = Some(f);
    }
    match figures {
        [Some(grouped), Some(spread), Some(unordered)] => Ok(Round {
            grouped,
            spread,
            unordered,
        }),
        _ => anyhow::bail!("ordering: a layout was not drained"),
    }
}

fn cpu(c: Option<f64>) -> String {
    c.map(|c| format!("{c:.3} s/10k rows"))
        .unwrap_or_else(|| "n/a".into())
}

/// The median of `values` (the lower middle one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

/// What ordering costs: `1 − ordered ÷ unordered`, in percent.
fn cost(ordered: f64, unordered: f64) -> f64 {
    if unordered <= 0.0 {
        return 0.0;
    }
    (1.0 - ordered / unordered) * 100.0
}

pub fn add_to_report(report: &mut Report, rounds: &[Round]) {
    if rounds.is_empty() {
        return;
    }
    let s = "ordering";
    let rate = |pick: fn(&Round) -> &Figures| -> f64 {
        median(rounds.iter().map(|r| pick(r).rows_per_s).collect())
    };
    let pg = |pick: fn(&Round) -> &Figures| -> Option<f64> {
        let all: Option<Vec<f64>> = rounds.iter().map(|r| pick(r).pg_cpu_per_10k).collect();
        all.map(median)
    };
    let (grouped, spread, unordered) = (
        rate(|r| &r.grouped),
        rate(|r| &r.spread),
        rate(|r| &r.unordered),
    );
    report.info(s, "rounds (drains per layout)", rounds.len().to_string());
    for (layout, rows_per_s, cpu_per_10k) in [
        ("grouped", grouped, pg(|r| &r.grouped)),
        ("spread", spread, pg(|r| &r.spread)),
        ("unordered", unordered, pg(|r| &r.unordered)),
    ] {
        report.info(
            s,
            &format!("{layout}: median rows/s, PostgreSQL CPU"),
            format!("{} rows/s, {}", thousands(rows_per_s), cpu(cpu_per_10k)),
        );
    }
    let per_round = |pick: fn(&Round) -> &Figures| -> String {
        rounds
            .iter()
            .map(|r| format!("{:.0} %", cost(pick(r).rows_per_s, r.unordered.rows_per_s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.info(
        s,
        "ordering costs, grouped (medians; per round)",
        format!(
            "{:.0} % ({})",
            cost(grouped, unordered),
            per_round(|r| &r.grouped)
        ),
    );
    report.info(
        s,
        "ordering costs, spread (medians; per round)",
        format!(
            "{:.0} % ({})",
            cost(spread, unordered),
            per_round(|r| &r.spread)
        ),
    );
    let out_of_order: usize = rounds
        .iter()
        .flat_map(|r| [&r.grouped, &r.spread])
        .map(|f| f.out_of_order)
        .sum();
    report.info(s, "rows out of their key's order", out_of_order.to_string());
}

#[cfg(test)]
mod tests {
    use super::{cost, median};

    #[test]
    fn the_cost_is_the_share_of_unordered_throughput_lost() {
        assert_eq!(cost(80.0, 100.0).round(), 20.0);
        assert_eq!(cost(100.0, 100.0), 0.0);
        assert!(
            cost(110.0, 100.0) < 0.0,
            "faster ordered is a negative cost"
        );
        assert_eq!(cost(5.0, 0.0), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
    }
}
