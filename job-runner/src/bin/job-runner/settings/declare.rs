//! The macro that turns each setting's one declaration into a field of [`Layer`] (what
//! one source says: flags with the environment, or the file) and of `Settings` (what is
//! in force), and into the line that picks it.
//!
//! [`Layer`]: super::Layer

/// Declares the settings: doc, `#[arg(...)]`, `name: Type = default;` per setting.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        #[arg($($arg:tt)*)]
        $name:ident: $ty:ty = $default:expr;
    )+) => {
        /// What one source of settings says, `None` where it is silent: the command line
        /// with the environment (clap), or the TOML file (serde; unknown keys are an
        /// error).
        #[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct Layer {
            $(
                $(#[doc = $doc])+
                #[arg($($arg)*)]
                pub(crate) $name: Option<$ty>,
            )+
        }

        /// The settings in force, after precedence; checked by `Settings::resolve`.
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        pub(crate) struct Settings {
            $(
                $(#[doc = $doc])+
                pub(crate) $name: $ty,
            )+
        }

        impl Layer {
            /// This layer over `below`, then the defaults.
            fn over(self, below: Layer) -> Settings {
                Settings {
                    $($name: self.$name.or(below.$name).unwrap_or_else(|| $default),)+
                }
            }
        }
    };
}

pub(super) use settings;
