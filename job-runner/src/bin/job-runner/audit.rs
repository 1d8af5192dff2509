//! `job-runner ledger audit`: "charged exactly once", checked over the ledger's log.

use job_runner::ledger::Ledger;

use crate::exit::Exit;
use crate::settings::Settings;

/// Prints the audit; 1 on any violation.
pub(crate) fn audit(settings: &Settings) -> Result<i32, Exit> {
    let path = &settings.ledger;
    if !path.exists() {
        return Err(Exit::new(1, format!("no ledger at {}", path.display())));
    }
    let audit = Ledger::open(path)
        .and_then(|l| l.audit())
        .map_err(|e| Exit::failed(&e))?;
    say!("{audit}");
    Ok(if audit.violations() == 0 { 0 } else { 1 })
}
