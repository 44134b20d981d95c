//! Domain names. Every VM Contractor creates is named `contractor-` followed by 1 to 50
//! characters from `[a-z0-9-]`, so that `list` and `reap` can tell Contractor's domains from
//! everyone else's by name alone and never touch a domain they did not create.

use std::io::Read;

/// The prefix of every Contractor domain name.
pub const NAME_PREFIX: &str = "contractor-";

/// The longest suffix after [`NAME_PREFIX`].
const MAX_SUFFIX: usize = 50;

/// Errors about domain names.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The name does not match `contractor-[a-z0-9-]{1,50}`.
    #[error(
        "invalid VM name {name:?}: names are `contractor-` followed by 1 to 50 characters \
         from a-z, 0-9 and `-` (for example `contractor-build-42`)"
    )]
    Invalid {
        /// The rejected name.
        name: String,
    },
    /// No randomness to generate a name from.
    #[error("cannot read /dev/urandom to generate a VM name")]
    Random(#[source] std::io::Error),
}

/// Checks that `name` matches `contractor-[a-z0-9-]{1,50}`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let ok = name.strip_prefix(NAME_PREFIX).is_some_and(|suffix| {
        (1..=MAX_SUFFIX).contains(&suffix.len())
            && suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            name: name.to_owned(),
        })
    }
}

/// True when `name` is a Contractor domain name (see [`validate_name`]).
pub fn is_contractor_name(name: &str) -> bool {
    validate_name(name).is_ok()
}

/// A fresh name: `contractor-` and 12 random hex characters.
pub fn generate_name() -> Result<String, NameError> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(NameError::Random)?;
    let mut name = String::from(NAME_PREFIX);
    for b in bytes {
        name.push_str(&format!("{b:02x}"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for name in [
            "contractor-a",
            "contractor-build-42",
            "contractor-0123456789ab",
        ] {
            assert!(validate_name(name).is_ok(), "{name}");
        }
        let longest = format!("contractor-{}", "a".repeat(50));
        assert!(validate_name(&longest).is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        let too_long = format!("contractor-{}", "a".repeat(51));
        for name in [
            "",
            "contractor-",
            "contractor",
            "builder-1",
            "contractor-ABC",
            "contractor-a_b",
            "contractor-a.b",
            "contractor-a/b",
            "contractor-a'b",
            "contractor-é",
            "xcontractor-a",
            too_long.as_str(),
        ] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generate_name().expect("name");
        let b = generate_name().expect("name");
        assert!(validate_name(&a).is_ok());
        assert_eq!(a.len(), NAME_PREFIX.len() + 12);
        assert_ne!(a, b);
    }
}
