//! `synesis paths`: where Synesis keeps its files, and why there.

use serde::Serialize;

use super::Output;
use crate::paths::{Dir, Paths};

pub(crate) fn run(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct View<'a> {
        #[serde(flatten)]
        paths: &'a Paths,
        config_file: std::path::PathBuf,
    }
    let view = View {
        paths,
        config_file: paths.config_file(),
    };
    out.report(&view, || {
        let row = |name: &str, dir: &Dir| {
            format!("{name:<8} {}  ({:?})\n", dir.path.display(), dir.source)
        };
        format!(
            "{}{}{}",
            row("config", &paths.config),
            row("data", &paths.data),
            row("runtime", &paths.runtime)
        )
    })?;
    Ok(())
}
