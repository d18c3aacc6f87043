//! The runbook (`deploy/RUNBOOK.md`) against the alert rules: one section per alert and one
//! alert per section, each section saying what the alert means, its impact, three things to
//! look at and the fix; and every alert's `runbook_url` pointing at its own section.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The parts every section has, in this order, each a line starting with its label.
const PARTS: [&str; 4] = ["**Means:**", "**Impact:**", "**Look at:**", "**Fix:**"];
/// What every `runbook_url` ends with before the section's anchor.
pub(super) const URL_STEM: &str = "RUNBOOK.md#";

/// What the runbook holds.
#[derive(Debug, Default)]
pub(super) struct RunbookSummary {
    pub(super) sections: usize,
    pub(super) linked: usize,
}

/// One `## ` section of the runbook.
#[derive(Debug)]
struct Section<'a> {
    title: &'a str,
    line: usize,
    body: Vec<&'a str>,
}

/// The anchor GitHub (and most Markdown renderers) give a heading: lower case, spaces as `-`,
/// other punctuation dropped.
pub(super) fn anchor(title: &str) -> String {
    title
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// The level-2 sections of a Markdown text (headings inside fenced code are not headings).
fn sections(text: &str) -> Vec<Section<'_>> {
    let mut out: Vec<Section<'_>> = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && let Some(title) = line.strip_prefix("## ") {
            out.push(Section {
                title: title.trim(),
                line: i + 1,
                body: Vec::new(),
            });
        } else if let Some(s) = out.last_mut() {
            s.body.push(line);
        }
    }
    out
}

/// Checks the runbook's text (`at_f` names it) against `alerts`.
pub(super) fn check_runbook(
    text: &str,
    at_f: &str,
    alerts: &[AlertRule],
    report: &mut Report,
) -> RunbookSummary {
    let mut summary = RunbookSummary::default();
    let sections = sections(text);
    let mut titles = BTreeSet::new();
    for s in &sections {
        summary.sections += 1;
        let at_s = format!("{at_f}:{}: section {}", s.line, s.title);
        report.expect(titles.insert(s.title), || format!("{at_s}: appears twice"));
        report.expect(alerts.iter().any(|a| a.name == s.title), || {
            format!("{at_s}: no alert rule of that name in deploy/prometheus/alerts.yaml")
        });
        check_parts(&at_s, &s.body, report);
    }
    for a in alerts {
        report.expect(titles.contains(a.name.as_str()), || {
            format!("{}: {at_f} has no section `## {}`", a.at, a.name)
        });
        let want = format!("{URL_STEM}{}", anchor(&a.name));
        match &a.runbook_url {
            Some(url) if url.ends_with(&want) && !url.contains(char::is_whitespace) => {
                report.checks += 1;
                summary.linked += 1;
            }
            Some(url) => report.fail(format!(
                "{}: annotations.runbook_url {url:?} does not end in {want:?}",
                a.at
            )),
            None => report.fail(format!(
                "{}: annotations.runbook_url is missing (…/{want})",
                a.at
            )),
        }
    }
    summary
}

/// A section has its four parts in order, three numbered things to look at, and a command in
/// its fix.
fn check_parts(at_s: &str, body: &[&str], report: &mut Report) {
    let starts: Vec<Option<usize>> = PARTS
        .iter()
        .map(|p| body.iter().position(|l| l.starts_with(p)))
        .collect();
    for (part, start) in PARTS.iter().zip(&starts) {
        report.expect(start.is_some(), || format!("{at_s}: no {part} part"));
    }
    let [Some(means), Some(impact), Some(look), Some(fix)] = starts[..] else {
        return;
    };
    report.expect(means < impact && impact < look && look < fix, || {
        format!(
            "{at_s}: its parts must come in the order {}",
            PARTS.join(" ")
        )
    });
    let looks = body
        .get(look..fix)
        .unwrap_or_default()
        .iter()
        .filter(|l| {
            let l = l.trim_start();
            l.find(". ")
                .is_some_and(|dot| dot > 0 && l[..dot].chars().all(|c| c.is_ascii_digit()))
        })
        .count();
    report.expect(looks >= 3, || {
        format!("{at_s}: **Look at:** lists {looks} numbered items, not at least 3")
    });
    let fix_text = body.get(fix..).unwrap_or_default().join("\n");
    report.expect(fix_text.contains('`'), || {
        format!("{at_s}: **Fix:** names no command (in `code`)")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(name: &str, url: Option<&str>) -> AlertRule {
        AlertRule {
            name: name.to_owned(),
            at: format!("alerts.yaml: {name}"),
            runbook_url: url.map(str::to_owned),
        }
    }

    const SECTION: &str = "**Means:** m\n\n**Impact:** i\n\n**Look at:**\n\n1. a\n2. b\n3. c\n\n**Fix:** `uploader drain`\n";

    #[test]
    fn anchors_are_githubs() {
        assert_eq!(
            anchor("SpillwayUploaderSpoolFull"),
            "spillwayuploaderspoolfull"
        );
        assert_eq!(anchor("Spool full (reject)"), "spool-full-reject");
    }

    #[test]
    fn every_alert_has_a_section_and_every_section_an_alert() {
        let text = format!(
            "# Runbook\n\nIntro.\n\n```sh\n## not a heading\n```\n\n## A\n\n{SECTION}\n## B\n\n{SECTION}\n## Gone\n\n{SECTION}"
        );
        let alerts = [
            alert("A", Some("deploy/RUNBOOK.md#a")),
            alert("B", Some("https://docs.example/RUNBOOK.md#a")),
            alert("C", None),
        ];
        let mut report = Report::default();
        let s = check_runbook(&text, "RUNBOOK.md", &alerts, &mut report);
        assert_eq!((s.sections, s.linked), (3, 1));
        assert_eq!(
            report.failures,
            [
                "RUNBOOK.md:37: section Gone: no alert rule of that name in deploy/prometheus/alerts.yaml",
                "alerts.yaml: B: annotations.runbook_url \"https://docs.example/RUNBOOK.md#a\" does not end in \"RUNBOOK.md#b\"",
                "alerts.yaml: C: RUNBOOK.md has no section `## C`",
                "alerts.yaml: C: annotations.runbook_url is missing (…/RUNBOOK.md#c)",
            ]
        );
    }

    #[test]
    fn a_section_needs_its_four_parts_three_things_to_look_at_and_a_command() {
        let text = "## A\n\n**Means:** m\n\n**Look at:**\n\n1. a\n2. b\n\n**Fix:** scale up\n\n**Impact:** late\n";
        let mut report = Report::default();
        check_runbook(text, "R", &[alert("A", Some("RUNBOOK.md#a"))], &mut report);
        assert_eq!(
            report.failures,
            [
                "R:1: section A: its parts must come in the order **Means:** **Impact:** **Look at:** **Fix:**",
                "R:1: section A: **Look at:** lists 2 numbered items, not at least 3",
                "R:1: section A: **Fix:** names no command (in `code`)",
            ]
        );
        let mut report = Report::default();
        check_runbook(
            "## A\n\nnothing\n",
            "R",
            &[alert("A", Some("RUNBOOK.md#a"))],
            &mut report,
        );
        assert_eq!(report.failures.len(), 4, "{:?}", report.failures);
    }

    /// The repository's runbook covers the repository's alert rules, and nothing else.
    #[test]
    fn the_repository_runbook_matches_the_alerts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let metrics = exposed_metrics().unwrap();
        let mut report = Report::default();
        let alerts = check_alerts(
            &root.join("deploy/prometheus/alerts.yaml"),
            "alerts.yaml",
            &metrics,
            &mut report,
        )
        .unwrap();
        let text = std::fs::read_to_string(root.join("deploy/RUNBOOK.md")).unwrap();
        let s = check_runbook(&text, "RUNBOOK.md", &alerts.alerts, &mut report);
        assert!(report.failures.is_empty(), "{:#?}", report.failures);
        assert_eq!(s.sections, alerts.alerts.len());
        assert_eq!(s.linked, alerts.alerts.len());
    }
}
