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
        /// The HTTP API's key (`synesis serve`), once it was made.
        api_key_file: std::path::PathBuf,
    }
    let view = View {
        paths,
        config_file: paths.config_file(),
        api_key_file: paths.api_key_file(),
    };
    out.report(&view, || {
        let row = |name: &str, dir: &Dir| {
            format!("{name:<8} {}  ({:?})\n", dir.path.display(), dir.source)
        };
        format!(
            "{}{}{}api key  {}  (the HTTP API's, `synesis serve`; made on its first start)\n",
            row("config", &paths.config),
            row("data", &paths.data),
            row("runtime", &paths.runtime),
            paths.api_key_file().display()
        )
    })?;
    Ok(())
}
