//! One function per command. Each prints text for people, or JSON with `--json`.

use serde::Serialize;

use crate::paths::Paths;

/// Where a command's report goes, and in which form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Output {
        Output { json }
    }

    /// Prints `value` as one line of JSON, or `human` for people.
    pub(crate) fn report<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(value)?);
        } else {
            print!("{}", human());
        }
        Ok(())
    }
}

pub(crate) fn paths(out: &Output, paths: &Paths) -> anyhow::Result<()> {
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
        let row = |name: &str, dir: &crate::paths::Dir| {
            format!("{name:<8} {}  ({:?})\n", dir.path.display(), dir.source)
        };
        format!(
            "{}{}{}",
            row("config", &paths.config),
            row("data", &paths.data),
            row("runtime", &paths.runtime)
        )
    })
}
