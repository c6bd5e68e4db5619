//! `dinomo bench`: the in-process benchmark, its sweep and elastic scenario, and the
//! benchmark of a running cluster (`--target`).

use super::{JsonOut, Usage};

pub(crate) fn run(a: &dinomo::bench::cli::BenchArgs) -> anyhow::Result<()> {
    if a.sweep {
        let s = a.to_sweep().map_err(Usage)?;
        dinomo::bench::sweep::sweep(&s)?;
        return Ok(());
    }
    if a.scenario.is_some() {
        let e = a.to_elastic().map_err(Usage)?;
        let json = JsonOut::check(a.json.as_deref())?;
        let r = json.on_error(dinomo::bench::elastic::run(&e))?;
        print!("{}", dinomo::bench::elastic::render(&r));
        println!(
            "wrote {}",
            ["elastic.csv", "elastic.svg", "elastic.png"]
                .map(|f| e.out.join(f).display().to_string())
                .join(", ")
        );
        json.write(&r)?;
        return Ok(());
    }
    let cfg = a.to_config().map_err(Usage)?;
    let json = JsonOut::check(a.json.as_deref())?;
    if let Some(t) = &a.target {
        let targets: Vec<String> = t.split(',').map(|s| s.trim().to_string()).collect();
        let r = json.on_error(dinomo::bench::target::run(&cfg, &targets))?;
        print!("{}", dinomo::bench::target::render(&r));
        json.write(&r)?;
        return Ok(());
    }
    let r = json.on_error(dinomo::bench::run(&cfg))?;
    print!("{}", dinomo::bench::render(&r));
    json.write(&r)?;
    Ok(())
}
