//! The results: each figure beside its target, correctness problems (which make the
//! bench exit non-zero), and notes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A figure without a target.
    Info,
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub scenario: &'static str,
    pub metric: String,
    pub value: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    /// Lost or duplicated rows, failed exits, leftovers: the run is wrong.
    pub problems: Vec<String>,
}

impl Report {
    /// A figure with a target; `met` says whether the value reaches it.
    pub fn target(
        &mut self,
        scenario: &'static str,
        metric: &str,
        value: String,
        target: &str,
        met: bool,
    ) {
        let verdict = if met { Verdict::Met } else { Verdict::Missed };
        self.figures.push(Figure {
            scenario,
            metric: metric.into(),
            value,
            target: target.into(),
            verdict,
        });
    }

    pub fn info(&mut self, scenario: &'static str, metric: &str, value: String) {
        self.figures.push(Figure {
            scenario,
            metric: metric.into(),
            value,
            target: String::new(),
            verdict: Verdict::Info,
        });
    }

    pub fn problems(&mut self, problems: impl IntoIterator<Item = String>) {
        for p in problems {
            eprintln!("PROBLEM: {p}");
            self.problems.push(p);
        }
    }

    pub fn markdown(&self) -> String {
        let mut out =
            String::from("| scenario | figure | measured | target | |\n|---|---|---:|---|---|\n");
        for f in &self.figures {
            let mark = match f.verdict {
                Verdict::Met => "met",
                Verdict::Missed => "**missed**",
                Verdict::Info => "",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                f.scenario, f.metric, f.value, f.target, mark
            ));
        }
        out
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or(""))
        .collect();
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}", groups.join(","))
}
