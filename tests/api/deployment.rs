//! deploy/kubernetes against the built binary: the Deployment's init
//! container, then its server container, each started with the manifest's
//! arguments, literal environment and volumes (files under a temporary
//! directory standing in for the mounted Secrets and ConfigMap, certificates
//! made here), must do what the kubelet expects: the init container exits 0,
//! the readiness and startup probes are answered SERVING in plaintext, the
//! liveness probe connects, and SIGTERM ends the server with status 0 within
//! the grace period, which holds the drain timeout and what follows it. The
//! init containers of several pods starting together against one fresh
//! PostgreSQL database all exit 0, one of them migrating. (Schema and static
//! consistency of the overlays: .ci/check-manifests.sh.)

use crate::helpers::{
    self,
    process::ServerProcess,
    tls::{Ca, Pem},
};

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use customer_mapping::config::{KUBERNETES_GRACE_PERIOD, Settings, bounds};
use serde_json::Value;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The base every overlay applies: the pod template is the same in all of
/// them (the overlays change replicas, the image, the Secret's and the
/// Issuer's names).
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base");

/// Every object in the manifests (kustomization.yaml aside), as JSON.
fn objects() -> Vec<Value> {
    let mut objects = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(MANIFESTS)
        .expect("deploy/kubernetes/base")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a manifest");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !object.is_null() {
                objects.push(object);
            }
        }
    }
    objects
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind} in the manifests");
    found[0]
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The throwaway certificates that stand in for the TLS Secret.
struct Pki {
    ca: Ca,
    server: Pem,
}

/// The only container of a pod template's `containers` or
/// `initContainers`.
fn only_container<'a>(template: &'a Value, list: &str) -> &'a Value {
    let containers = template["spec"][list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} in the pod template"));
    assert_eq!(containers.len(), 1, "one of {list} per pod");
    &containers[0]
}

/// One container of a pod template, as the kubelet would run it here: its
/// arguments, its literal environment with every mounted path moved under
/// `root`, and the files of its volumes written there.
struct Pod {
    args: Vec<String>,
    env: Vec<(String, String)>,
    container: Value,
}

impl Pod {
    fn lay_out(
        template: &Value,
        container: &Value,
        objects: &[Value],
        root: &Path,
        pki: &Pki,
        url: &str,
    ) -> Self {
        let container = container.clone();
        let volumes: HashMap<String, &Value> = template["spec"]["volumes"]
            .as_array()
            .map(|v| v.iter().map(|v| (text(&v["name"]), v)).collect())
            .unwrap_or_default();
        let mounts: Vec<(String, &Value)> = container["volumeMounts"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| (text(&m["mountPath"]), volumes[&text(&m["name"])]))
                    .collect()
            })
            .unwrap_or_default();

        let mut env = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let (name, value) = (text(&var["name"]), text(&var["value"]));
            assert!(
                var.get("value").is_some(),
                "{name}: only literal values are laid out here"
            );
            let Some((mount, volume)) = mounts
                .iter()
                .find(|(mount, _)| Path::new(&value).starts_with(mount))
            else {
                env.push((name, value));
                continue;
            };
            let key = Path::new(&value)
                .strip_prefix(mount)
                .expect("under the mount")
                .to_string_lossy()
                .into_owned();
            let contents = match name.as_str() {
                // The placeholder Secret's URL names a server that is not
                // here: a SQLite file takes its place.
                "DATABASE_URL_FILE" => url.to_owned(),
                "TLS_CERT_FILE" => pki.server.cert.clone(),
                "TLS_KEY_FILE" => pki.server.key.clone(),
                "TLS_CLIENT_CA_FILE" => pki.ca.pem(),
                _ => volume_data(volume, objects, &key)
                    .unwrap_or_else(|| panic!("{name}={value}: no key {key} in its volume")),
            };
            let file = root.join(mount.trim_start_matches('/')).join(&key);
            std::fs::create_dir_all(file.parent().expect("a directory")).expect("mkdir");
            std::fs::write(&file, contents).expect("write a volume file");
            env.push((name, file.display().to_string()));
        }
        Self {
            args: container["args"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default(),
            env,
            container,
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A port as the manifest gives it (a number or a container port name).
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).expect("a port number");
        }
        let name = text(port);
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| text(&p["name"]) == name)
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or_else(|| panic!("port {name} names no container port"))
    }
}

/// A Secret's or ConfigMap's value for `key`, from the manifests.
fn volume_data(volume: &Value, objects: &[Value], key: &str) -> Option<String> {
    let (kind, name) = if let Some(secret) = volume.get("secret") {
        ("Secret", text(&secret["secretName"]))
    } else {
        ("ConfigMap", text(&volume["configMap"]["name"]))
    };
    let object = named(objects, kind, &name)?;
    ["data", "stringData"]
        .iter()
        .find_map(|field| object[field].get(key).map(text))
}

/// The manifest's port of each address setting, mapped to where the server
/// (on port 0 here, on 127.0.0.1) actually listens.
fn bound_ports(pod: &Pod, serving: &Value, main: SocketAddr) -> HashMap<u16, SocketAddr> {
    let mut bound = HashMap::new();
    for (var, actual) in [
        ("LISTEN_ADDR", Some(main)),
        (
            "HEALTH_LISTEN_ADDR",
            serving["health"].as_str().and_then(|a| a.parse().ok()),
        ),
        (
            "METRICS_ADDR",
            serving["metrics"].as_str().and_then(|a| a.parse().ok()),
        ),
    ] {
        if let Some(declared) = pod.var(var) {
            let declared: SocketAddr = declared.parse().expect("an address");
            let actual = actual.unwrap_or_else(|| panic!("{var} is set but not served"));
            bound.insert(declared.port(), actual);
        }
    }
    bound
}

/// The environment to run `pod` with here: every address on 127.0.0.1, port 0.
fn local_env(pod: &Pod) -> Vec<(String, String)> {
    pod.env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "LISTEN_ADDR" | "HEALTH_LISTEN_ADDR" | "METRICS_ADDR" => {
                (k.clone(), "127.0.0.1:0".to_owned())
            }
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

/// The kubelet's gRPC probe: one Health/Check in plaintext.
async fn grpc_probe(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(helpers::channel(addr).await);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("the probe of {service:?} on {addr} fails: {e}"));
    ServingStatus::try_from(reply.into_inner().status).expect("a known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_runs_as_its_manifests_say() {
    let objects = objects();
    let deployment = one(&objects, "Deployment");
    let template = &deployment["spec"]["template"];
    let ca = Ca::new("deployment test CA");
    let pki = Pki {
        server: ca.server(),
        ca,
    };
    let volumes = tempfile::tempdir().expect("a temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        volumes.path().join("customer-mapping.db").display()
    );

    // The init container first, as the kubelet orders them: the server
    // doesn't migrate.
    let init = Pod::lay_out(
        template,
        only_container(template, "initContainers"),
        &objects,
        &volumes.path().join("init"),
        &pki,
        &url,
    );
    let migrated = Command::new(helpers::process::BINARY)
        .args(&init.args)
        .env_clear()
        .envs(local_env(&init))
        .output()
        .expect("the binary runs");
    assert!(
        migrated.status.success(),
        "the init container's {:?} failed: {}{}",
        init.args,
        String::from_utf8_lossy(&migrated.stdout),
        String::from_utf8_lossy(&migrated.stderr)
    );

    let pod = Pod::lay_out(
        template,
        only_container(template, "containers"),
        &objects,
        &volumes.path().join("pod"),
        &pki,
        &url,
    );
    assert_eq!(pod.args, ["serve"], "ServerProcess runs `serve`");
    let env = local_env(&pod);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = ServerProcess::start(&env);
    let serving = server.wait_for_event(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("serving"))
    });
    assert_eq!(serving["transport"], "mutual TLS", "{serving}");
    assert_eq!(serving["policy"], "enforced", "{serving}");
    let bound = bound_ports(&pod, &serving, server.addr);
    let probes = &pod.container;

    for kind in ["startupProbe", "readinessProbe"] {
        let probe = &probes[kind]["grpc"];
        assert!(probe.is_object(), "{kind} is a gRPC probe");
        let addr = bound[&pod.port(&probe["port"])];
        let service = probe["service"].as_str().unwrap_or_default();
        helpers::wait_for_health(addr, service, ServingStatus::Serving).await;
        assert_eq!(
            grpc_probe(addr, service).await,
            ServingStatus::Serving,
            "{kind}"
        );
    }
    let liveness = &probes["livenessProbe"]["tcpSocket"];
    assert!(liveness.is_object(), "liveness is a TCP probe");
    let addr = bound[&pod.port(&liveness["port"])];
    tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("the liveness probe can't connect to {addr}: {e}"));

    // The main port answers a client with a certificate from the Secret's CA
    // that the ConfigMap's policy names.
    let policy: Value = serde_json::from_str(
        std::fs::read_to_string(pod.var("POLICY_FILE").expect("POLICY_FILE"))
            .expect("the policy file")
            .as_str(),
    )
    .expect("the policy is JSON");
    let caller = text(&policy["callers"][0]["certificate_names"][0]);
    let identity = pki.ca.client(&caller);
    let channel = helpers::tls::tls_channel(server.addr, &pki.ca.pem(), Some(&identity))
        .await
        .expect("a mutual-TLS connection");
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health over mutual TLS");
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);

    // The drain, then the pool's close and the exit, fit in the grace
    // period: the server's own bound says how long those take.
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .map_or(KUBERNETES_GRACE_PERIOD, Duration::from_secs);
    let drain = pod.var("SHUTDOWN_DRAIN_TIMEOUT").map_or_else(
        || Settings::defaults().shutdown_drain_timeout,
        |d| {
            bounds::SHUTDOWN_DRAIN_TIMEOUT
                .check(d)
                .expect("a drain timeout")
        },
    );
    let after_drain = KUBERNETES_GRACE_PERIOD - bounds::SHUTDOWN_DRAIN_TIMEOUT.max;
    assert!(
        drain + after_drain <= grace,
        "terminationGracePeriodSeconds {grace:?} must hold SHUTDOWN_DRAIN_TIMEOUT {drain:?} \
         and {after_drain:?} more"
    );
    server.sigterm();
    let (status, took, server) = server.exited(grace).await;
    assert_eq!(status.code(), Some(0), "output: {:?}", server.lines());
    println!(
        "deploy/kubernetes: init container exit 0; probes {:?} SERVING, liveness connects; SIGTERM -> 0 in {took:?} (grace {grace:?}, drain {drain:?})",
        ["startupProbe", "readinessProbe"]
    );
}

/// Pods of one rollout start together, and each one's init container runs
/// `customer-mapping migrate` against the same database. With a fresh
/// PostgreSQL database (the first install), every one of them must exit 0
/// (an init container that fails holds its pod back), exactly one must
/// apply the migrations (the others wait for its advisory lock and find
/// nothing pending), and the schema must be complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_starting_together_migrate_once() {
    const PODS: usize = 4;
    let limit = Duration::from_secs(90);
    let objects = objects();
    let template = &one(&objects, "Deployment")["spec"]["template"];
    let database = helpers::TestDatabase::create(helpers::Backend::Postgres).await;
    let ca = Ca::new("deployment test CA");
    let pki = Pki {
        server: ca.server(),
        ca,
    };
    let volumes = tempfile::tempdir().expect("a temporary directory");

    let mut pods = Vec::new();
    for n in 0..PODS {
        let root = volumes.path().join(format!("pod-{n}"));
        let init = Pod::lay_out(
            template,
            only_container(template, "initContainers"),
            &objects,
            &root,
            &pki,
            &database.url,
        );
        let log = root.join("init.log");
        let file = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(helpers::process::BINARY)
            .args(&init.args)
            .env_clear()
            .envs(local_env(&init))
            .stdout(file.try_clone().expect("a second handle"))
            .stderr(file)
            .spawn()
            .expect("the binary runs");
        pods.push((child, log));
    }

    // All were started before any is waited for; each gets `limit` at most.
    let started = std::time::Instant::now();
    let mut outputs = Vec::new();
    for (mut child, log) in pods {
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!(
                    "an init container did not exit within {limit:?}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let output = std::fs::read_to_string(&log).expect("the init container's log");
        assert!(
            status.success(),
            "an init container exited {status}: {output}"
        );
        outputs.push(output);
    }
    let applied = outputs
        .iter()
        .filter(|o| o.contains("Applying all pending migrations"))
        .count();
    let waited = outputs
        .iter()
        .filter(|o| o.contains("another process is applying migrations"))
        .count();
    assert_eq!(
        applied, 1,
        "exactly one init container applies the migrations: {outputs:#?}"
    );

    let mut options = sea_orm::ConnectOptions::new(database.url.clone());
    options.max_connections(1).sqlx_logging(false);
    let db = sea_orm::Database::connect(options)
        .await
        .expect("the test database");
    let versions: Vec<String> = sea_orm::ConnectionTrait::query_all_raw(
        &db,
        sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ),
    )
    .await
    .expect("seaql_migrations")
    .iter()
    .map(|row| row.try_get::<String>("", "version").expect("a version"))
    .collect();
    let mut expected = migration::names();
    expected.sort();
    assert_eq!(versions, expected, "every migration applied once");
    let invalid = helpers::pg::count(
        &db,
        "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         WHERE NOT i.indisvalid AND c.relnamespace = 'public'::regnamespace",
    )
    .await;
    assert_eq!(invalid, 0, "no index left half-built");
    db.close().await.expect("the connection closes");
    println!(
        "{PODS} init containers at once: all exit 0 in {:?}, 1 applied, {waited} waited for its lock",
        started.elapsed()
    );
}
