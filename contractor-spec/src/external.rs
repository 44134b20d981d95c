//! The spec as a build's signed provenance records it: the statement's
//! `externalParameters` (SLSA's "the inputs the build was asked for"). They are made here,
//! from the checked [`BuildSpec`], so that the statement a build signs and the plan of its
//! rebuild (which contractor-attest compares with the statement field by field) are the
//! same rendering of the same spec.

use serde_json::{json, Value};

use crate::spec::BuildSpec;

/// The statement's `externalParameters`: the spec as given (script, fetch, environment,
/// artifacts, image, network, limits) and how many downloads its lock pins.
pub fn external_parameters(spec: &BuildSpec) -> Value {
    json!({
        "script": spec.script,
        "fetch": spec.fetch,
        "env": spec.env,
        "artifacts": spec.artifacts,
        "image": {
            "name": spec.image,
            "base": spec.derived.as_ref().map(|d| d.base.clone()),
            "packages": spec.derived.as_ref().map(|d| d.packages.clone()).unwrap_or_default(),
        },
        "network": {
            "allow": spec.allow,
            "inspect": spec.inspect,
            "tunnel": spec.tunnel,
        },
        "limits": {
            "timeoutSecs": spec.timeout.as_secs(),
            "maxLogBytes": spec.max_log_bytes,
            "maxArtifactsBytes": spec.max_artifacts_bytes,
        },
        "lockedDownloads": spec.lock.as_ref().map(|l| l.downloads.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_parameters_are_the_spec_as_given() {
        let text = "[build]\nscript = \"make\"\ntimeout = \"15m\"\nartifacts = [\"out/app\"]\n\
                    [image]\nbase = \"debian-12\"\npackages = [\"make\", \"gcc\"]\n\
                    [network]\nallow = [\"deb.debian.org\"]\n";
        let spec = crate::spec::parse(Path::new("p/contractor.toml"), text).expect("a spec");
        let params = external_parameters(&spec);
        assert_eq!(params["script"], "make");
        assert_eq!(params["artifacts"], json!(["out/app"]));
        assert_eq!(params["image"]["name"], json!(spec.image));
        assert_eq!(params["image"]["base"], "debian-12");
        assert_eq!(params["image"]["packages"], json!(["gcc", "make"]));
        assert_eq!(params["network"]["allow"], json!(["deb.debian.org"]));
        assert_eq!(params["limits"]["timeoutSecs"], 900);
        assert_eq!(params["lockedDownloads"], Value::Null);
        let mut keys: Vec<&String> = params.as_object().expect("an object").keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "artifacts",
                "env",
                "fetch",
                "image",
                "limits",
                "lockedDownloads",
                "network",
                "script"
            ]
        );
    }
}
