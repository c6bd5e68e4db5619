//! `dinomo fabric-bench`: one-sided verbs over a fabric, perftest style.

use super::{install_stop_handler, Usage, STOP};

pub(crate) fn run(a: dinomo::fabric_bench::BenchArgs) -> anyhow::Result<()> {
    use dinomo::fabric_bench::BenchError;
    if a.server {
        install_stop_handler()?;
    }
    match dinomo::fabric_bench::main(&a, &STOP) {
        Ok(Some(report)) => {
            print!("{}", report.render());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(BenchError::Usage(m)) => Err(Usage(m).into()),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}
