//! A client pod and a fleet of endpoint pods behind one HTTP service, for tests and benchmarks of
//! what keel does when endpoints fail: each endpoint is a real process (`endpoint`) in its own
//! pod, with or without a sidecar, in the region and zone the spec gives it, and the test kills
//! it, restarts it, takes its link down or marks it not ready.
//!
//! The mesh: service `web` in namespace `ha` (VIP [`VIP`], port 80 to 8080), selecting the
//! endpoints, with the traffic policy and routes the spec gives; the client pod `a` (meshed, in
//! region `r1`, zone `zone-a`) calls it. A control plane in this process serves a temporary
//! directory, rewritten when readiness changes.
//!
//! It must never leave a pod, process or namespace behind: everything goes when it is dropped.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use keel_control_plane::ControlPlane;

use crate::endpoint::{Control, Mode};
use crate::netns::{MeshedPod, Metrics, Pod, Process, Sidecar, TestNetwork};
use crate::traffic::Target;

pub const NAMESPACE: &str = "ha";
pub const TRUST_DOMAIN: &str = "ha.local";
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const HOST: &str = "web.ha.svc.cluster.local";
pub const SERVICE: &str = "ha/web";
pub const APP_PORT: u16 = 8080;
/// Generous: a test fails because something never happens, not because the machine is slow.
const READY: Duration = Duration::from_secs(30);

/// The sidecars' log filter: `KEEL_TEST_PROXY_LOG` (e.g. `keel_proxy=debug`), else `info`.
fn proxy_log() -> &'static str {
    static LOG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LOG.get_or_init(|| std::env::var("KEEL_TEST_PROXY_LOG").unwrap_or_else(|_| "info".to_owned()))
}

/// One endpoint of the fleet.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// The pod's and the workload's name; what the endpoint answers in `x-served-by`.
    pub name: String,
    pub region: String,
    pub zone: String,
    /// Whether it has a sidecar (the client then reaches it over HTTP/2 through it).
    pub meshed: bool,
    pub mode: Mode,
}

impl EndpointSpec {
    pub fn new(name: &str, region: &str, zone: &str, meshed: bool) -> EndpointSpec {
        EndpointSpec {
            name: name.to_owned(),
            region: region.to_owned(),
            zone: zone.to_owned(),
            meshed,
            mode: Mode::Ok,
        }
    }
}

/// Six unmeshed endpoints, two per zone, named after their zone (`a1`, `a2`, `b1`...): zone-a
/// is the client's (locality priority 0), zone-b shares its region (1), zone-c is in another
/// region (2).
pub fn three_zones() -> Vec<EndpointSpec> {
    let mut eps = Vec::new();
    for (zone, region, prefix) in [
        ("zone-a", "r1", "a"),
        ("zone-b", "r1", "b"),
        ("zone-c", "r2", "c"),
    ] {
        for i in 1..=2 {
            eps.push(EndpointSpec::new(
                &format!("{prefix}{i}"),
                region,
                zone,
                false,
            ));
        }
    }
    eps
}

/// What to build.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub endpoints: Vec<EndpointSpec>,
    /// Lines of the TrafficPolicy's `spec` after `targetRef`, indented by two spaces.
    pub traffic_policy: String,
    /// Lines of the Service's `spec` after `selector` (its `routes`), indented by two spaces.
    pub routes: String,
    /// The endpoint program and the arguments before `--listen` (e.g. a binary that re-executes
    /// itself with a subcommand).
    pub endpoint_command: Vec<OsString>,
}

/// An endpoint pod and its application process.
pub struct EndpointPod {
    pub spec: EndpointSpec,
    app: Option<Process>,
    sidecar: Option<MeshedPod>,
    plain: Option<Pod>,
}

impl EndpointPod {
    fn pod(&self) -> Option<&Pod> {
        match (&self.sidecar, &self.plain) {
            (Some(m), _) => Some(&m.pod),
            (None, p) => p.as_ref(),
        }
    }

    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.pod().map(Pod::ip)
    }

    /// The application's address (through the sidecar's inbound side when meshed).
    pub fn app_addr(&self) -> Option<SocketAddr> {
        self.ip().map(|ip| SocketAddr::from((ip, APP_PORT)))
    }

    pub fn sidecar(&self) -> Option<&MeshedPod> {
        self.sidecar.as_ref()
    }
}

/// The running fleet. Fields drop in order: endpoints (processes, sidecars, pods), the client,
/// the control plane, the YAML, the network.
pub struct Fleet {
    endpoints: Vec<EndpointPod>,
    client: MeshedPod,
    control_plane: ControlPlane,
    dir: tempfile::TempDir,
    net: TestNetwork,
    spec: FleetSpec,
    program: std::path::PathBuf,
    control: Control,
}

/// Replaces a file of the watched directory in one step.
fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).with_context(|| format!("writing {name}"))?;
    std::fs::rename(&temporary, dir.join(name)).with_context(|| format!("replacing {name}"))
}

fn services_yaml(spec: &FleetSpec) -> String {
    format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: {TRUST_DOMAIN}}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  vips: [{VIP}]
  ports:
  - {{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}
  selector: {{app: web}}
{routes}---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  targetRef: {{service: web}}
{policy}",
        routes = spec.routes,
        policy = spec.traffic_policy,
    )
}

fn workload_yaml(
    name: &str,
    app: &str,
    ip: Ipv4Addr,
    region: &str,
    zone: &str,
    meshed: bool,
    ready: bool,
) -> String {
    format!(
        "\
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels: {{app: {app}}}
spec:
  serviceAccount: {name}
  addresses: [{ip}]
  locality: {{region: {region}, zone: {zone}}}
  meshed: {meshed}
  ready: {ready}
"
    )
}

impl Fleet {
    /// Builds the network, the control plane, the client and every endpoint, and waits until all
    /// are up.
    pub async fn start(spec: FleetSpec) -> anyhow::Result<Fleet> {
        let program = spec
            .endpoint_command
            .first()
            .context("no endpoint program")?
            .clone();
        let net = TestNetwork::create()?;
        let program = net.stage_executable(Path::new(&program))?;
        let dir = tempfile::tempdir()?;
        write_atomically(dir.path(), "services.yaml", &services_yaml(&spec))?;
        let client_ip = net.host(2);
        let ips: Vec<Ipv4Addr> = (0..spec.endpoints.len())
            .map(|i| net.host(10 + i as u8))
            .collect();
        write_atomically(
            dir.path(),
            "workloads.yaml",
            &Self::workloads(&spec, client_ip, &ips, &[]),
        )?;
        // The fleet runs as a mesh runs: with a CA, every hop between sidecars over mTLS.
        let control_plane = net.start_control_plane(dir.path()).await?;
        let identity = net.stage_identity(&control_plane, TRUST_DOMAIN)?;
        let client_token = identity.token_file(&net, NAMESPACE, "a")?;
        let client_sidecar = Sidecar {
            control_plane: control_plane.discovery_addr,
            identity: Some(identity.sidecar(&client_token)),
            workload: "a",
            namespace: NAMESPACE,
            service_account: "a",
            region: "r1",
            zone: "zone-a",
            log: proxy_log(),
        };
        let client = net.add_meshed_pod("a", client_ip, &client_sidecar)?;
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        for (e, ip) in spec.endpoints.iter().zip(&ips) {
            let (sidecar, plain) = if e.meshed {
                let name: &str = &e.name;
                let token = identity.token_file(&net, NAMESPACE, name)?;
                let s = Sidecar {
                    control_plane: control_plane.discovery_addr,
                    identity: Some(identity.sidecar(&token)),
                    workload: name,
                    namespace: NAMESPACE,
                    service_account: name,
                    region: &e.region,
                    zone: &e.zone,
                    log: proxy_log(),
                };
                (Some(net.add_meshed_pod(name, *ip, &s)?), None)
            } else {
                (None, Some(net.add_pod(&e.name, *ip)?))
            };
            endpoints.push(EndpointPod {
                spec: e.clone(),
                app: None,
                sidecar,
                plain,
            });
        }
        let mut fleet = Fleet {
            endpoints,
            client,
            control_plane,
            dir,
            net,
            spec,
            program,
            control: Control::default(),
        };
        for i in 0..fleet.endpoints.len() {
            fleet.spawn_app(i)?;
        }
        fleet.client.wait_ready(READY).await?;
        for e in &mut fleet.endpoints {
            if let Some(sidecar) = e.sidecar.as_mut() {
                sidecar.wait_ready(READY).await?;
            }
        }
        for i in 0..fleet.endpoints.len() {
            fleet.wait_app(i).await?;
        }
        Ok(fleet)
    }

    fn workloads(
        spec: &FleetSpec,
        client: Ipv4Addr,
        ips: &[Ipv4Addr],
        not_ready: &[&str],
    ) -> String {
        let mut yaml = workload_yaml("a", "client", client, "r1", "zone-a", true, true);
        for (e, ip) in spec.endpoints.iter().zip(ips) {
            let ready = !not_ready.contains(&e.name.as_str());
            yaml += &workload_yaml(&e.name, "web", *ip, &e.region, &e.zone, e.meshed, ready);
        }
        yaml
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.endpoints
            .iter()
            .position(|e| e.spec.name == name)
            .with_context(|| format!("no endpoint named {name}"))
    }

    fn spawn_app(&mut self, i: usize) -> anyhow::Result<()> {
        let e = &self.endpoints[i];
        let pod = e.pod().context("the endpoint has no pod")?;
        let mut argv: Vec<OsString> = vec![self.program.clone().into_os_string()];
        argv.extend(self.spec.endpoint_command.iter().skip(1).cloned());
        argv.extend(
            [
                "--listen".to_owned(),
                format!("0.0.0.0:{APP_PORT}"),
                "--name".to_owned(),
                e.spec.name.clone(),
                "--mode".to_owned(),
                e.spec.mode.name(),
            ]
            .map(OsString::from),
        );
        let app = pod.spawn("app", argv)?;
        self.endpoints[i].app = Some(app);
        Ok(())
    }

    async fn wait_app(&self, i: usize) -> anyhow::Result<()> {
        let addr = self.endpoints[i]
            .app_addr()
            .context("the endpoint has no pod")?;
        self.control.wait_up(addr, READY).await.map(drop)
    }

    /// Where client traffic goes: the service's VIP, from the client pod.
    pub fn target(&self) -> Target {
        Target {
            from: self.client.netns_path(),
            to: SocketAddr::from((VIP, 80)),
            host: HOST.to_owned(),
            path: "/".to_owned(),
        }
    }

    pub fn endpoint(&self, name: &str) -> anyhow::Result<&EndpointPod> {
        Ok(&self.endpoints[self.index(name)?])
    }

    pub fn endpoints(&self) -> &[EndpointPod] {
        &self.endpoints
    }

    /// Kills an endpoint's application process (SIGKILL); its pod and sidecar stay.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name)?;
        ensure!(
            self.endpoints[i].app.take().is_some(),
            "{name} is not running"
        );
        Ok(())
    }

    /// Sends `signal` to an endpoint's sidecar (SIGTERM drains it, as when its pod is deleted).
    pub fn signal_sidecar(&mut self, name: &str, signal: libc::c_int) -> anyhow::Result<()> {
        let i = self.index(name)?;
        let sidecar = self.endpoints[i]
            .sidecar
            .as_mut()
            .with_context(|| format!("{name} has no sidecar"))?;
        sidecar
            .proxy
            .signal(signal)
            .with_context(|| format!("signalling {name}'s sidecar"))
    }

    /// How an endpoint's sidecar exited, once it has.
    pub fn sidecar_exited(
        &mut self,
        name: &str,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let i = self.index(name)?;
        let sidecar = self.endpoints[i]
            .sidecar
            .as_mut()
            .with_context(|| format!("{name} has no sidecar"))?;
        Ok(sidecar.proxy.exited())
    }

    /// Starts an endpoint's application again and waits until it answers.
    pub async fn restart(&mut self, name: &str, mode: Mode) -> anyhow::Result<()> {
        let i = self.index(name)?;
        ensure!(self.endpoints[i].app.is_none(), "{name} is running");
        self.endpoints[i].spec.mode = mode;
        self.spawn_app(i)?;
        self.wait_app(i).await
    }

    /// Sets an endpoint's mode through its control requests.
    pub async fn set_mode(&self, name: &str, mode: Mode) -> anyhow::Result<()> {
        let addr = self.endpoint(name)?.app_addr().context("no pod")?;
        self.control.set_mode(addr, mode).await
    }

    /// An endpoint's own counts.
    pub async fn stats(&self, name: &str) -> anyhow::Result<crate::endpoint::Stats> {
        let addr = self.endpoint(name)?.app_addr().context("no pod")?;
        self.control.stats(addr).await
    }

    /// Takes the pod's network link down or up: packets are dropped, nothing is refused.
    pub fn link(&self, name: &str, up: bool) -> anyhow::Result<()> {
        let pod = self.endpoint(name)?.pod().context("no pod")?;
        let state = if up { "up" } else { "down" };
        let out = pod.exec(["ip", "link", "set", "dev", "eth0", state])?;
        if !out.status.success() {
            bail!(
                "ip link set eth0 {state} in {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if up {
            // The default route went with the link.
            let gateway = self.net.gateway().to_string();
            let _ = pod.exec(["ip", "route", "replace", "default", "via", &gateway]);
            let vips = crate::netns::DEFAULT_SERVICE_RANGE.to_string();
            let _ = pod.exec(["ip", "route", "replace", &vips, "via", &gateway]);
        }
        Ok(())
    }

    /// Marks endpoints not ready (or ready again) in the mesh YAML, as Kubernetes readiness would.
    pub fn set_not_ready(&self, names: &[&str]) -> anyhow::Result<()> {
        let ips: Vec<Ipv4Addr> = self
            .endpoints
            .iter()
            .map(|e| e.ip().unwrap_or(Ipv4Addr::UNSPECIFIED))
            .collect();
        write_atomically(
            self.dir.path(),
            "workloads.yaml",
            &Self::workloads(&self.spec, self.client.ip(), &ips, names),
        )
    }

    /// The client sidecar's metrics now.
    pub async fn client_metrics(&self) -> anyhow::Result<Metrics> {
        self.client.metrics().await
    }

    /// An endpoint sidecar's metrics now.
    pub async fn endpoint_metrics(&self, name: &str) -> anyhow::Result<Metrics> {
        match self.endpoint(name)?.sidecar() {
            Some(s) => s.metrics().await,
            None => bail!("{name} has no sidecar"),
        }
    }

    /// The client sidecar's logs and every endpoint sidecar's, for failure messages.
    pub fn logs(&self) -> String {
        let mut logs = self.client.logs();
        for e in &self.endpoints {
            if let Some(s) = e.sidecar() {
                logs += &s.logs();
            }
        }
        logs
    }

    /// The control plane (kept for as long as the fleet).
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }
}

/// The client sidecar's view of an endpoint: `keel_endpoint_healthy` (1 or 0), if reported.
pub fn endpoint_healthy(metrics: &Metrics, ip: Ipv4Addr) -> Option<f64> {
    let ip = ip.to_string();
    metrics
        .matching(
            "keel_endpoint_healthy",
            &[("service", SERVICE), ("endpoint", ip.as_str())],
        )
        .map(|s| s.value)
        .next()
}

/// Ejections of an endpoint counted by the client sidecar.
pub fn ejections(metrics: &Metrics, ip: Ipv4Addr) -> f64 {
    let ip = ip.to_string();
    metrics.sum(
        "keel_outlier_ejections_total",
        &[("service", SERVICE), ("endpoint", ip.as_str())],
    )
}
