//! Reading `.env`, as the migration command and the example programs do.

/// Loads `.env` (the first in this directory or above it) into the environment; none is
/// fine.
///
/// # Errors
///
/// One line that says why it cannot be read: for a malformed line, its number and variable
/// (never any of its value, which may be a password; dotenvy's own message quotes it) and
/// how to quote such a value.
pub fn load() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(value, _)) => Err(format!(
            "cannot read .env: {} is malformed; quote a value that holds spaces, quotes, `#` \
             or `$` in single quotes (KEY='a b'), or one that holds `'` in double quotes, \
             writing `$` as `\\$`",
            malformed_at(&value).map_or_else(
                || "a line".to_owned(),
                |(number, name)| format!("line {number} ({name})")
            )
        )),
        Err(e) => Err(format!("cannot read .env: {e}")),
    }
}

/// Where in the `.env` that dotenvy read (the first in this directory or above it) the
/// malformed `value` stands, by what dotenvy quotes of it: the line's number and the name it
/// sets, never any of the value.
fn malformed_at(value: &str) -> Option<(usize, String)> {
    let value = value.trim_end();
    if value.is_empty() {
        return None;
    }
    let path = std::env::current_dir()
        .ok()?
        .ancestors()
        .map(|dir| dir.join(".env"))
        .find(|path| path.is_file())?;
    let text = std::fs::read_to_string(path).ok()?;
    // The line whose whole value it is; none named when several are.
    let mut found = text.lines().enumerate().filter_map(|(i, line)| {
        let (_, after) = line.split_once('=')?;
        let name = (after.trim() == value).then(|| variable_of(line))??;
        Some((i + 1, name.to_owned()))
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The name a `.env` line sets (`NAME=...`, or `export NAME=...`), if it has the shape of
/// one: never any of its value.
fn variable_of(line: &str) -> Option<&str> {
    let (name, _) = line.split_once('=')?;
    let name = name.trim();
    let name = name.strip_prefix("export ").unwrap_or(name).trim();
    let mut chars = name.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    .then_some(name)
}
