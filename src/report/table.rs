//! Plain-text tables and the number formats every summary uses: thousands
//! separators, dollars, shares and nearest-rank percentiles.

/// The nearest-rank percentile of ascending `sorted` values: the smallest
/// value with at least `p` percent of the values at or below it. `None` for
/// no values; `p` is clamped to 0..=100.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// `1234567` → `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Dollars with enough decimals to show sub-cent totals.
pub fn usd(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("${x:.2}")
    } else if x.abs() >= 1.0 {
        format!("${x:.4}")
    } else {
        format!("${x:.6}")
    }
}

/// `n` as a percentage of `of`, one decimal; `-` when `of` is zero.
pub fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return "-".into();
    }
    format!("{:.1}%", n as f64 * 100.0 / of as f64)
}

/// `s` on one line, cut to `max` characters with `...`.
pub fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut t: String = one_line.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// Starts a titled section, a blank line after the previous one.
pub fn section(out: &mut String, title: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push('\n');
}

/// A plain-text table: text columns left-aligned, number columns
/// right-aligned, two spaces between columns, indented by two.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Option<Vec<String>>>,
    /// Per column: holds text (left-aligned).
    text: Vec<bool>,
}

impl Table {
    /// A table with these column names; the first column holds text.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            text: (0..header.len()).map(|i| i == 0).collect(),
        }
    }

    /// The first `n` columns hold text (left-aligned).
    pub fn text_columns(mut self, n: usize) -> Table {
        for (i, t) in self.text.iter_mut().enumerate() {
            *t = i < n;
        }
        self
    }

    /// Column `i` holds text too.
    pub fn text_column(mut self, i: usize) -> Table {
        if let Some(t) = self.text.get_mut(i) {
            *t = true;
        }
        self
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Some(cells));
    }

    /// A horizontal rule before the next row.
    pub fn rule(&mut self) {
        self.rows.push(None);
    }

    /// The table, one line per row.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in self.rows.iter().flatten() {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut text = String::from(" ");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = width.saturating_sub(cell.chars().count());
                text.push(' ');
                if self.text[i] {
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad));
                } else {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                }
                text.push(' ');
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &self.header);
        let rule_width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        let rule = format!("  {}\n", "-".repeat(rule_width));
        out.push_str(&rule);
        for row in &self.rows {
            match row {
                Some(cells) => line(&mut out, cells),
                None => out.push_str(&rule),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));

        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000];
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(1000));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(1000));

        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1, 2], f64::NAN), Some(1));
        assert_eq!(percentile(&[1, 2], 250.0), Some(2));
    }

    #[test]
    fn group_inserts_thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn usd_keeps_small_amounts_readable() {
        assert_eq!(usd(0.000123), "$0.000123");
        assert_eq!(usd(1.5), "$1.5000");
        assert_eq!(usd(1234.567), "$1234.57");
    }

    #[test]
    fn long_messages_are_cut_to_one_line() {
        assert_eq!(truncate("a\nb", 10), "a b");
        assert_eq!(truncate("abcdefghij", 6), "abc...");
    }
}
