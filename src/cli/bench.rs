//! `dinomo bench`: the in-process benchmark, its sweep and elastic scenario, and the
//! benchmark of a running cluster (`--target`).

use std::path::Path;

use dinomo::redis_client::Credentials;
use dinomo_shared::auth::read_private_file;

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
        let credentials = match &a.password_file {
            Some(p) => Some(password_from(p)?),
            None => None,
        };
        let r = json.on_error(dinomo::bench::target::run(
            &cfg,
            &targets,
            credentials.as_ref(),
        ))?;
        print!("{}", dinomo::bench::target::render(&r));
        json.write(&r)?;
        return Ok(());
    }
    let r = json.on_error(dinomo::bench::run(&cfg))?;
    print!("{}", dinomo::bench::render(&r));
    json.write(&r)?;
    Ok(())
}

/// The default user's password from `--password-file` (one line, a private file like the
/// one `dinomo up` writes), or a usage error naming the file.
fn password_from(path: &Path) -> anyhow::Result<Credentials> {
    let text = read_private_file(path).map_err(|e| Usage(format!("--password-file: {e}")))?;
    let mut lines = text.lines();
    let password = lines.next().unwrap_or_default().to_string();
    if password.is_empty() || lines.any(|l| !l.trim().is_empty()) {
        return Err(Usage(format!(
            "--password-file {}: the file must hold one line, the password",
            path.display()
        ))
        .into());
    }
    Ok(Credentials {
        user: None,
        password,
    })
}
