//! The runtime image, built without a registry from what the Dockerfile says.
//!
//! The Dockerfile's last stage is read ([`parse`]): its `FROM debian:SUITE-slim` becomes a
//! base made here from Debian's packages (`mmdebstrap --variant=minbase`, with the path
//! excludes Debian's own `-slim` images use), its `apt-get install` packages go into that
//! base, its `COPY --from=builder` takes the release binary this workspace built, treated
//! as the builder stage's `strip` command treats it, and its LABEL, ENV, WORKDIR, USER,
//! ENTRYPOINT and CMD are kept as written ([`Recipe::containerfile`]). Any other
//! instruction is an error: the recipe cannot drift from the Dockerfile silently. The base
//! tarball is cached in `target/vm/container/` keyed by its inputs.
use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::process;

/// Bump when [`build_base`] changes in a way its arguments do not show.
const RECIPE_VERSION: u32 = 1;

/// What debuerreotype's `--slimify` leaves out of Debian's `-slim` images.
const SLIM_EXCLUDES: [&str; 4] = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
];

#[derive(Debug, PartialEq)]
pub struct Recipe {
    /// `bookworm` of `FROM debian:bookworm-slim`.
    pub suite: String,
    /// The last stage's `apt-get install` packages.
    pub packages: Vec<String>,
    /// `COPY --from=builder SRC DST`: (the builder's output path, DST).
    pub copies: Vec<(String, String)>,
    /// The builder's `strip` options and input for each of its outputs, e.g.
    /// `/hotplug-agent` -> (`["--strip-debug"]`, `target/release/hotplug-agent`).
    pub stripped: Vec<(String, Vec<String>, String)>,
    /// Kept as written: LABEL, ENV, WORKDIR, USER, ENTRYPOINT, CMD.
    pub kept: Vec<String>,
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

pub fn parse(dockerfile: &str) -> anyhow::Result<Recipe> {
    // Stages: (name, instructions after FROM).
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    for ins in instructions(dockerfile) {
        let (op, rest) = ins.split_once(' ').unwrap_or((&ins, ""));
        if op.eq_ignore_ascii_case("FROM") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => String::new(),
                [_, as_, name] if as_.eq_ignore_ascii_case("AS") => (*name).to_owned(),
                _ => bail!("FROM {rest:?}: not understood"),
            };
            stages.push((words[0].to_owned(), name, Vec::new()));
        } else {
            let stage = stages.last_mut().context("an instruction before FROM")?;
            stage.2.push(ins);
        }
    }
    let (base, _, last) = stages.last().context("no FROM")?;
    let suite = base
        .strip_prefix("debian:")
        .and_then(|t| t.strip_suffix("-slim"))
        .with_context(|| {
            format!("FROM {base}: only debian:SUITE-slim can be made here without a registry")
        })?
        .to_owned();
    let mut recipe = Recipe {
        suite,
        packages: Vec::new(),
        copies: Vec::new(),
        stripped: Vec::new(),
        kept: Vec::new(),
    };
    for ins in last {
        let (op, rest) = ins.split_once(' ').unwrap_or((ins, ""));
        match op.to_ascii_uppercase().as_str() {
            "RUN" => recipe.packages.extend(apt_install(rest)?),
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let [from, src, dst] = words.as_slice() else {
                    bail!("COPY {rest:?}: only `COPY --from=STAGE SRC DST` is translated");
                };
                let stage = from
                    .strip_prefix("--from=")
                    .with_context(|| format!("COPY {rest:?}: only from a build stage"))?;
                let (_, _, builder) = stages
                    .iter()
                    .find(|(_, name, _)| name == stage)
                    .with_context(|| format!("COPY --from={stage}: no such stage"))?;
                let (opts, input) =
                    strip_of(builder, src).with_context(|| format!("COPY --from={stage} {src}"))?;
                recipe.copies.push(((*src).to_owned(), (*dst).to_owned()));
                recipe.stripped.push(((*src).to_owned(), opts, input));
            }
            // ARG: podman build substitutes it in the LABELs that name it (REVISION, ...).
            "ARG" | "LABEL" | "ENV" | "WORKDIR" | "USER" | "ENTRYPOINT" | "CMD" => {
                recipe.kept.push(ins.clone())
            }
            other => bail!("{other} in the runtime stage: not translated"),
        }
    }
    Ok(recipe)
}

/// `apt-get update && apt-get install -y --no-install-recommends P... && rm -rf
/// /var/lib/apt/lists/*` -> the packages; anything else in a RUN is refused.
fn apt_install(run: &str) -> anyhow::Result<Vec<String>> {
    let mut packages = Vec::new();
    for command in run.split("&&") {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["apt-get", "update"] => {}
            // mmdebstrap leaves no package lists behind.
            ["rm", "-rf", "/var/lib/apt/lists/*"] => {}
            ["apt-get", "install", rest @ ..] => {
                for w in rest {
                    match *w {
                        "-y" | "--no-install-recommends" => {}
                        w if w.starts_with('-') => bail!("apt-get install {w}: not translated"),
                        w => packages.push(w.to_owned()),
                    }
                }
            }
            _ => bail!(
                "RUN {}: not translated (only apt-get installs)",
                command.trim()
            ),
        }
    }
    Ok(packages)
}

/// In the builder stage, the `strip OPTS -o OUTPUT INPUT` that makes `output`.
fn strip_of(builder: &[String], output: &str) -> anyhow::Result<(Vec<String>, String)> {
    for ins in builder {
        for command in ins.split("&&") {
            let words: Vec<&str> = command.split_whitespace().collect();
            if words.first() != Some(&"strip") {
                continue;
            }
            let o = words.iter().position(|w| *w == "-o");
            if let Some(o) = o
                && words.get(o + 1) == Some(&output)
            {
                let input = words.get(o + 2).context("strip -o OUTPUT without input")?;
                let opts = words[1..o].iter().map(|s| (*s).to_owned()).collect();
                return Ok((opts, (*input).to_owned()));
            }
        }
    }
    bail!("the builder stage has no `strip ... -o {output} INPUT`")
}

impl Recipe {
    /// The Containerfile over the local base: the copies from a `builder/` directory in the
    /// build context, then the kept instructions.
    pub fn containerfile(&self, base: &str) -> String {
        let mut out = format!(
            "# Derived from the Dockerfile's runtime stage by cargo xtask vm-test\n\
             # (xtask/src/vm/container/recipe.rs); the base is debian:{}-slim made locally.\n\
             FROM {base}\n",
            self.suite
        );
        for (src, dst) in &self.copies {
            out.push_str(&format!("COPY builder{src} {dst}\n"));
        }
        for ins in &self.kept {
            out.push_str(ins.trim_end());
            out.push('\n');
        }
        out
    }

    /// Key of the base tarball's inputs.
    pub fn base_key(&self) -> String {
        let mut h = DefaultHasher::new();
        (RECIPE_VERSION, &self.suite, &self.packages, SLIM_EXCLUDES).hash(&mut h);
        format!("{}-slim-{:016x}", self.suite, h.finish())
    }

    /// The builder's outputs, made from this workspace's files into `context/builder/`
    /// (the builder's `target/` is `target_dir`); the inputs used.
    pub fn stage_builder_outputs(
        &self,
        workspace: &Path,
        target_dir: &Path,
        context: &Path,
    ) -> anyhow::Result<Vec<PathBuf>> {
        let mut inputs = Vec::new();
        for (output, opts, input) in &self.stripped {
            let to = context.join(format!("builder{output}"));
            fs::create_dir_all(to.parent().context("builder path")?)?;
            let from = match input.strip_prefix("target/") {
                Some(rest) => target_dir.join(rest),
                None => workspace.join(input),
            };
            ensure!(
                from.exists(),
                "{} missing (the release build)",
                from.display()
            );
            let _ = fs::remove_file(&to);
            process::run(
                Command::new("strip")
                    .args(opts)
                    .arg("-o")
                    .arg(&to)
                    .arg(&from),
            )?;
            inputs.push(from);
        }
        Ok(inputs)
    }
}

/// `target/vm/container/<key>.tar`: the base, built unless cached. Returns the path and
/// the build time when it was built now.
pub fn build_base(recipe: &Recipe, dir: &Path) -> anyhow::Result<(PathBuf, Option<Duration>)> {
    let tar = dir.join(format!("{}.tar", recipe.base_key()));
    if tar.is_file() {
        return Ok((tar, None));
    }
    if process::which("mmdebstrap").is_none() {
        bail!("mmdebstrap not found (Debian package mmdebstrap; `cargo xtask setup` installs it)");
    }
    fs::create_dir_all(dir)?;
    // mmdebstrap picks its output format from the name: keep `.tar` at the end.
    let tmp = dir.join(format!(
        "{}.tmp-{}.tar",
        recipe.base_key(),
        std::process::id()
    ));
    let t = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        "--quiet",
    ])
    // /usr merged by a hook, not by the usrmerge package (which pulls in perl):
    // what the -slim images have.
    .arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
    // The Dockerfile's --no-install-recommends.
    .arg("--aptopt=APT::Install-Recommends \"false\"");
    for exclude in SLIM_EXCLUDES {
        cmd.arg(format!("--dpkgopt={exclude}"));
    }
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.suite).arg(&tmp);
    process::run(&mut cmd)?;
    fs::rename(&tmp, &tar)?;
    Ok((tar, Some(t.elapsed())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace;

    #[test]
    fn the_dockerfile() {
        let text = fs::read_to_string(workspace::root().join("Dockerfile")).unwrap();
        let r = parse(&text).unwrap();
        assert_eq!(r.suite, "bookworm");
        assert_eq!(r.packages, ["libudev1", "ca-certificates"]);
        assert_eq!(
            r.copies,
            [(
                "/hotplug-agent".into(),
                "/usr/local/bin/hotplug-agent".into()
            )]
        );
        assert_eq!(
            r.stripped,
            [(
                "/hotplug-agent".into(),
                vec!["--strip-debug".to_owned()],
                "target/release/hotplug-agent".into()
            )]
        );
        let file = r.containerfile("localhost/base:1");
        assert!(file.contains("FROM localhost/base:1\n"));
        assert!(file.contains("COPY builder/hotplug-agent /usr/local/bin/hotplug-agent\n"));
        assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/hotplug-agent\"]\n"));
        assert!(file.contains("CMD [\"run\"]\n"));
        assert!(file.contains("org.opencontainers.image.title=\"hotplug-agent\""));
    }

    #[test]
    fn refuses_what_it_cannot_make() {
        let ok = "FROM rust AS builder\nRUN strip -o /a b\nFROM debian:bookworm-slim\n";
        assert!(parse(ok).is_ok());
        for (bad, why) in [
            ("FROM alpine:3\nCMD [\"x\"]\n", "debian:SUITE-slim"),
            (
                "FROM debian:bookworm-slim\nRUN curl http://x | sh\n",
                "only apt-get installs",
            ),
            ("FROM debian:bookworm-slim\nADD x /x\n", "ADD"),
            ("FROM debian:bookworm-slim\nCOPY x /x\n", "COPY"),
            (
                "FROM rust AS builder\nRUN cargo build\nFROM debian:bookworm-slim\nCOPY --from=builder /a /b\n",
                "strip",
            ),
            (
                "FROM debian:bookworm-slim\nRUN apt-get install --reinstall x\n",
                "--reinstall",
            ),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(format!("{err:#}").contains(why), "{bad}: {err:#}");
        }
    }

    #[test]
    fn key_follows_the_packages() {
        let text = "FROM debian:bookworm-slim\nRUN apt-get install -y a\n";
        let a = parse(text).unwrap();
        let b = parse(&text.replace("-y a", "-y b")).unwrap();
        assert_ne!(a.base_key(), b.base_key());
        assert_eq!(a.base_key(), parse(text).unwrap().base_key());
    }
}
