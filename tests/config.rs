//! Configuration: flag > environment > config file > default, config file location, and
//! unknown keys.

mod support;

use serde_json::Value;
use std::fs;
use support::*;

/// The source `mesync send` writes into the outbox file, run with `overrides` and `extra`.
fn source_of_send(agent: &Agent, extra: &[&str], overrides: &[(&str, Option<&str>)]) -> String {
    let mut args = vec!["send", "cfg.test", "--payload", "{}"];
    args.extend_from_slice(extra);
    let out = agent
        .cmd_with(&args, overrides)
        .ok("mesync send with a config");
    let id = out.stdout.trim().to_string();
    let msg: Value = agent
        .messages("outbox")
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .unwrap_or_else(|| panic!("message {id} not in outbox: {:?}", agent.files("outbox")));
    msg["source"].as_str().unwrap_or_default().to_string()
}

#[test]
fn host_id_from_config_file_unless_the_environment_sets_it() {
    let agent = Agent::new("http://127.0.0.1:9", "unused").without_env("MESYNC_HOST_ID");
    fs::write(
        agent.base().join("config.toml"),
        "host_id = \"from-file\"\npoll_interval = \"2s\"\nsent_ttl = \"1h\"\nhttp_timeout = 15\n",
    )
    .unwrap();
    assert_eq!(
        source_of_send(&agent, &[], &[]),
        "from-file",
        "file > default"
    );
    assert_eq!(
        source_of_send(&agent, &[], &[("MESYNC_HOST_ID", Some("from-env"))]),
        "from-env",
        "environment > file"
    );
}

#[test]
fn config_file_is_the_flag_else_mesync_config_else_base_dir() {
    let agent = Agent::new("http://127.0.0.1:9", "unused").without_env("MESYNC_HOST_ID");
    let other = tempfile::tempdir().unwrap();
    let env_file = other.path().join("env.toml");
    let flag_file = other.path().join("flag.toml");
    fs::write(
        agent.base().join("config.toml"),
        "host_id = \"from-base\"\n",
    )
    .unwrap();
    fs::write(&env_file, "host_id = \"from-mesync-config\"\n").unwrap();
    fs::write(&flag_file, "host_id = \"from-flag-file\"\n").unwrap();
    let env_file = env_file.to_str().unwrap();
    let flag_file = flag_file.to_str().unwrap();

    assert_eq!(source_of_send(&agent, &[], &[]), "from-base");
    assert_eq!(
        source_of_send(&agent, &[], &[("MESYNC_CONFIG", Some(env_file))]),
        "from-mesync-config",
        "$MESYNC_CONFIG > $MESYNC_BASE_DIR/config.toml"
    );
    assert_eq!(
        source_of_send(
            &agent,
            &["--config", flag_file],
            &[("MESYNC_CONFIG", Some(env_file))]
        ),
        "from-flag-file",
        "--config > $MESYNC_CONFIG"
    );
}

#[test]
fn running_agent_takes_flag_over_env_over_file() {
    let hub = Hub::start();
    // server_url in the file points nowhere: the environment must win for it.
    let config = "server_url = \"http://127.0.0.1:9\"\nhost_id = \"from-file\"\n";

    // host_id from the file, server_url from the environment.
    let mut from_file = Agent::new(&hub.url(), "unused").without_env("MESYNC_HOST_ID");
    fs::write(from_file.base().join("config.toml"), config).unwrap();
    from_file.start();

    // host_id from the environment over the file.
    let mut from_env = Agent::new(&hub.url(), "from-env");
    fs::write(from_env.base().join("config.toml"), config).unwrap();
    from_env.start();

    // host_id from the flag over the environment.
    let mut from_flag = Agent::new(&hub.url(), "flag-loses");
    fs::write(from_flag.base().join("config.toml"), config).unwrap();
    from_flag.start_with_args(&["--host-id", "from-flag"]);

    hub.wait_registered(&["from-file", "from-env", "from-flag"]);
    // The hostname would be the default, had the file been ignored.
    for loser in ["flag-loses".to_string(), hostname()] {
        assert!(
            !hub.is_registered(&loser),
            "{loser} must not be registered: a lower-priority setting won"
        );
    }
}

#[test]
fn unknown_config_key_is_an_error_naming_the_key() {
    let agent = Agent::new("http://127.0.0.1:9", "alpha");
    fs::write(
        agent.base().join("config.toml"),
        "host_id = \"alpha\"\nhots_idd = \"typo\"\n",
    )
    .unwrap();

    let out = agent.cmd(&["send", "cfg.test", "--payload", "{}"]);
    assert_eq!(out.code(), Some(1), "send with an unknown key: {out:?}");
    assert!(
        out.stderr.contains("hots_idd"),
        "stderr names the key: {out:?}"
    );
    assert!(out.stdout.trim().is_empty());
    assert!(
        list_dir_all(&agent.dir("outbox")).is_empty(),
        "nothing written to outbox"
    );

    let out = agent.cmd(&["start"]);
    assert_eq!(out.code(), Some(1), "start with an unknown key: {out:?}");
    assert!(
        out.stderr.contains("hots_idd"),
        "stderr names the key: {out:?}"
    );

    // A typo in the [hub] table stops the hub.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    fs::write(&file, "[hub]\nlisen = [\"127.0.0.1:0\"]\n").unwrap();
    let mut cmd = clean_command(dir.path());
    cmd.arg("serve")
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"));
    let out = run(cmd, None, TIMEOUT);
    assert_eq!(out.code(), Some(1), "serve with an unknown key: {out:?}");
    assert!(
        out.stderr.contains("lisen"),
        "stderr names the key: {out:?}"
    );
}

#[test]
fn host_id_defaults_to_the_system_hostname() {
    let hostname = hostname();
    let hub = Hub::start();
    let mut agent = Agent::new(&hub.url(), "unused").without_env("MESYNC_HOST_ID");
    assert_eq!(source_of_send(&agent, &[], &[]), hostname);

    agent.start();
    hub.wait_registered(&[&hostname]);
}
