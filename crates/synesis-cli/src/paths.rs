//! Where Synesis keeps its files on the device.
//!
//! Resolution is a pure function of the overrides (flags, or their environment variables, as
//! clap merged them) and the XDG environment, read once at the edge ([`XdgEnv::from_process`]).
//! Precedence, per directory: its own flag/variable, then `SYNESIS_HOME`, then XDG, then the
//! XDG default under `$HOME`.

use std::path::PathBuf;

use serde::Serialize;

use crate::exit::UserError;

/// What the user asked for explicitly.
#[derive(Debug, Default, Clone)]
pub(crate) struct PathOverrides {
    pub(crate) home: Option<PathBuf>,
    pub(crate) config_dir: Option<PathBuf>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) runtime_dir: Option<PathBuf>,
    /// The account to act in, by name or id (`--account`).
    pub(crate) account: Option<String>,
}

/// The XDG base-directory environment. Empty values count as unset, as the XDG spec says.
#[derive(Debug, Default, Clone)]
pub(crate) struct XdgEnv {
    pub(crate) home: Option<PathBuf>,
    pub(crate) config_home: Option<PathBuf>,
    pub(crate) data_home: Option<PathBuf>,
    pub(crate) runtime_dir: Option<PathBuf>,
}

impl XdgEnv {
    pub(crate) fn from_process() -> XdgEnv {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        XdgEnv {
            home: var("HOME"),
            config_home: var("XDG_CONFIG_HOME"),
            data_home: var("XDG_DATA_HOME"),
            runtime_dir: var("XDG_RUNTIME_DIR"),
        }
    }
}

/// Where one directory came from, for `synesis paths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Source {
    Flag,
    SynesisHome,
    Xdg,
    HomeDefault,
    DataDir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Dir {
    pub(crate) path: PathBuf,
    pub(crate) source: Source,
}

/// The resolved directories. Nothing is created here; commands create what they write into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Paths {
    pub(crate) config: Dir,
    pub(crate) data: Dir,
    pub(crate) runtime: Dir,
    /// The account commands act in, when one was named (`--account`).
    #[serde(skip)]
    pub(crate) account: Option<String>,
}

impl Paths {
    pub(crate) fn resolve(o: &PathOverrides, xdg: &XdgEnv) -> Result<Paths, UserError> {
        let pick =
            |flag: &Option<PathBuf>, home_sub: &str, xdg_dir: &Option<PathBuf>, default: &str| {
                if let Some(p) = flag {
                    return Ok(Dir {
                        path: p.clone(),
                        source: Source::Flag,
                    });
                }
                if let Some(h) = &o.home {
                    return Ok(Dir {
                        path: h.join(home_sub),
                        source: Source::SynesisHome,
                    });
                }
                if let Some(x) = xdg_dir {
                    return Ok(Dir {
                        path: x.join("synesis"),
                        source: Source::Xdg,
                    });
                }
                match &xdg.home {
                Some(h) => Ok(Dir {
                    path: h.join(default).join("synesis"),
                    source: Source::HomeDefault,
                }),
                None => Err(UserError::Usage(
                    "cannot tell where to keep Synesis files: HOME is not set; set SYNESIS_HOME"
                        .into(),
                )),
            }
            };
        let config = pick(&o.config_dir, "config", &xdg.config_home, ".config")?;
        let data = pick(&o.data_dir, "data", &xdg.data_home, ".local/share")?;
        // XDG has no default runtime directory; without one the socket lives beside the data.
        let runtime = match pick(&o.runtime_dir, "run", &xdg.runtime_dir, "") {
            Ok(dir) if dir.source != Source::HomeDefault => dir,
            _ => Dir {
                path: data.path.join("run"),
                source: Source::DataDir,
            },
        };
        Ok(Paths {
            config,
            data,
            runtime,
            account: o.account.clone(),
        })
    }

    pub(crate) fn config_file(&self) -> PathBuf {
        self.config.path.join("config.toml")
    }

    /// The home of the identity commands act in (`Identity::select`): the `--account` named,
    /// else the one `synesis cloud use` chose, else the first.
    pub(crate) fn identity_home(&self) -> Result<PathBuf, synesis_tunnel::IdentityError> {
        synesis_tunnel::Identity::select(&self.data.path, self.account.as_deref())
    }

    /// The key the HTTP API asks for (`synesis serve`), made on its first start (0600).
    pub(crate) fn api_key_file(&self) -> PathBuf {
        self.config.path.join(crate::api::auth::API_KEY_FILE)
    }

    /// Where the service writes its output when it runs in the background.
    pub(crate) fn service_log(&self) -> PathBuf {
        self.data.path.join("service.log")
    }

    /// The local ledger (`synesis_ledger_local`).
    pub(crate) fn ledger_file(&self) -> PathBuf {
        self.data.path.join(synesis_ledger_local::LEDGER_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xdg_home_only() -> XdgEnv {
        XdgEnv {
            home: Some("/home/ada".into()),
            ..XdgEnv::default()
        }
    }

    #[test]
    fn defaults_follow_xdg_under_home() {
        let p = Paths::resolve(&PathOverrides::default(), &xdg_home_only()).unwrap();
        assert_eq!(p.config.path, PathBuf::from("/home/ada/.config/synesis"));
        assert_eq!(p.data.path, PathBuf::from("/home/ada/.local/share/synesis"));
        assert_eq!(
            p.runtime.path,
            PathBuf::from("/home/ada/.local/share/synesis/run")
        );
        assert_eq!(p.runtime.source, Source::DataDir);
    }

    #[test]
    fn xdg_variables_are_honoured() {
        let xdg = XdgEnv {
            config_home: Some("/cfg".into()),
            data_home: Some("/dat".into()),
            runtime_dir: Some("/run/user/1000".into()),
            ..xdg_home_only()
        };
        let p = Paths::resolve(&PathOverrides::default(), &xdg).unwrap();
        assert_eq!(p.config.path, PathBuf::from("/cfg/synesis"));
        assert_eq!(p.data.path, PathBuf::from("/dat/synesis"));
        assert_eq!(p.runtime.path, PathBuf::from("/run/user/1000/synesis"));
    }

    #[test]
    fn synesis_home_moves_everything_and_flags_win_over_it() {
        let o = PathOverrides {
            home: Some("/tmp/dev1".into()),
            data_dir: Some("/big/disk".into()),
            ..PathOverrides::default()
        };
        let xdg = XdgEnv {
            runtime_dir: Some("/run/user/1000".into()),
            ..xdg_home_only()
        };
        let p = Paths::resolve(&o, &xdg).unwrap();
        assert_eq!(p.config.path, PathBuf::from("/tmp/dev1/config"));
        assert_eq!(
            p.data,
            Dir {
                path: "/big/disk".into(),
                source: Source::Flag
            }
        );
        assert_eq!(p.runtime.path, PathBuf::from("/tmp/dev1/run"));
        assert_eq!(
            p.config_file(),
            PathBuf::from("/tmp/dev1/config/config.toml")
        );
    }

    #[test]
    fn no_home_at_all_is_a_clear_error() {
        let err = Paths::resolve(&PathOverrides::default(), &XdgEnv::default()).unwrap_err();
        assert!(err.to_string().contains("SYNESIS_HOME"), "{err}");
    }
}
