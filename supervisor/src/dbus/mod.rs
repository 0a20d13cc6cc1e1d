//! The D-Bus front end of the [`Manager`]: bus name `org.corral.Manager1`.
//!
//! - `/org/corral/Manager1`, interface `org.corral.Manager1`: the methods
//!   (`ListApps`, `GetApp`, `StartApp`, `StopApp`, `RestartApp`, `Reload`,
//!   `Recompile`), the daemon's info as properties, and the
//!   `AppStateChanged` signal; `org.freedesktop.DBus.ObjectManager` there
//!   too, so `GetManagedObjects` lists every app with its properties and
//!   `InterfacesAdded`/`InterfacesRemoved` tell when a reload adds or
//!   removes one.
//! - `/org/corral/Manager1/app/<escaped name>` ([`path`]), interface
//!   `org.corral.App1`: one object per app, its fields as properties,
//!   `PropertiesChanged` when its state, workers, or other non-counter
//!   fields change.
//!
//! How answers map to the socket API's JSON is in [`interfaces`]; who may
//! call what is decided twice: by the bus policy shipped in
//! `units/dbus/org.corral.Manager1.conf`, and inside every mutating method
//! from the caller's credentials as the bus reports them
//! (`GetConnectionCredentials`), by [`Manager::authorize`].
//!
//! The objects exist before the name is requested, so no call finds the
//! name without its objects. A bus that can't be reached, or a name that
//! can't be owned, is logged as an error and corrald serves on without
//! D-Bus: the apps matter more than their management interface.

pub mod interfaces;
pub mod path;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use zbus::Variant;
use zbus::fdo::{self, RequestNameFlags, RequestNameReply};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, connection};

use crate::manager::{Event, Manager};
use interfaces::{
    APP_INTERFACE, APP_PROPERTIES_EMITTING, AppDict, AppObject, MANAGER_PROPERTIES_EMITTING,
    ManagerObject,
};
pub use path::{MANAGER_PATH, app_path};

/// The well-known bus name corrald owns.
pub const BUS_NAME: &str = "org.corral.Manager1";
/// The manager interface's name.
pub const MANAGER_INTERFACE: &str = "org.corral.Manager1";

/// How long connecting and taking the name may take before corrald gives
/// up on D-Bus (a bus that accepts but never answers must not hold back
/// READY=1 forever).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often app objects are checked against the Manager even without an
/// event (an app removed by a reload sends none).
const RESYNC_PERIOD: Duration = Duration::from_secs(2);

/// Which bus corrald serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Bus {
    /// The system bus: `DBUS_SYSTEM_BUS_ADDRESS`, else
    /// `/run/dbus/system_bus_socket`.
    #[default]
    System,
    /// The session bus: `DBUS_SESSION_BUS_ADDRESS`.
    Session,
    /// No D-Bus at all.
    None,
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bus::System => "system",
            Bus::Session => "session",
            Bus::None => "none",
        })
    }
}

/// The running D-Bus front end. Dropping it leaves the bus.
#[derive(Debug)]
pub struct DbusService {
    connection: Connection,
    sync: tokio::task::JoinHandle<()>,
}

impl DbusService {
    /// The connection (its unique name, for logs and tests).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for DbusService {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

/// Serve `manager` on `bus`: objects first, then the name. Returns `None`
/// (after logging why) when there is no bus or the name can't be had;
/// corrald goes on without D-Bus then. `explicit`: the operator asked for
/// this bus (`--bus`, `CORRAL_BUS`); when not, a machine with no system bus
/// at all (no `DBUS_SYSTEM_BUS_ADDRESS`, no socket) is an info line, not
/// an error.
pub async fn spawn(manager: Manager, bus: Bus, explicit: bool) -> Option<DbusService> {
    if bus == Bus::None {
        tracing::info!("D-Bus: off (--bus none)");
        return None;
    }
    if bus == Bus::System && !explicit && !system_bus_exists() {
        tracing::info!("D-Bus API off: no system bus ({SYSTEM_BUS_SOCKET} does not exist)");
        return None;
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, connect(manager, bus)).await {
        Ok(Ok(service)) => {
            tracing::info!(
                "D-Bus: serving {BUS_NAME} on the {bus} bus as {}",
                service
                    .connection
                    .unique_name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            );
            Some(service)
        }
        Ok(Err(e)) => {
            tracing::error!(
                "D-Bus: not serving {BUS_NAME} on the {bus} bus: {e:#} (--bus none: go without)"
            );
            None
        }
        Err(_) => {
            tracing::error!(
                "D-Bus: not serving {BUS_NAME} on the {bus} bus: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            );
            None
        }
    }
}

/// Where the system bus listens unless `DBUS_SYSTEM_BUS_ADDRESS` says.
const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

fn system_bus_exists() -> bool {
    std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some()
        || std::path::Path::new(SYSTEM_BUS_SOCKET).exists()
}

async fn connect(manager: Manager, bus: Bus) -> anyhow::Result<DbusService> {
    let resync = Arc::new(Notify::new());
    // Subscribe before the objects exist: no event falls between the first
    // sync and the loop.
    let events = manager.subscribe();
    let builder = match bus {
        Bus::System => connection::Builder::system(),
        Bus::Session => connection::Builder::session(),
        Bus::None => unreachable!("handled by spawn"),
    };
    let connection = builder
        .serve_at(
            MANAGER_PATH,
            ManagerObject::new(manager.clone(), resync.clone()),
        )
        .serve_at(MANAGER_PATH, fdo::ObjectManager)
        .build()
        .await
        // Not .context(): zbus's message already ends with its source's.
        .map_err(|e| anyhow::anyhow!("connecting: {e}"))?;
    let mut sync = Sync {
        connection: connection.clone(),
        manager,
        apps: BTreeMap::new(),
        daemon: AppDict::new(),
        lost: false,
    };
    sync.all().await;
    let reply = connection
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => {
                anyhow::anyhow!("another connection owns {BUS_NAME} (is another corrald running?)")
            }
            e => anyhow::Error::new(e).context(format!(
                "owning {BUS_NAME} (the bus policy units/dbus/{BUS_NAME}.conf must allow it)"
            )),
        })?;
    if !matches!(
        reply,
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner
    ) {
        anyhow::bail!("owning {BUS_NAME}: the bus answered {reply:?}");
    }
    let sync = tokio::spawn(sync.run(events, resync));
    Ok(DbusService { connection, sync })
}

/// Keeps the objects and signals in step with the Manager.
struct Sync {
    connection: Connection,
    manager: Manager,
    /// The emitting properties last announced, per app with an object.
    apps: BTreeMap<String, AppDict>,
    /// The emitting manager properties last announced.
    daemon: AppDict,
    /// The connection to the bus broke (the bus went away).
    lost: bool,
}

impl Sync {
    async fn run(mut self, mut events: broadcast::Receiver<Event>, resync: Arc<Notify>) {
        let mut tick = tokio::time::interval(RESYNC_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        // The object first, so that a client that reacts to
                        // the signal finds it.
                        self.all().await;
                        self.signal(&event).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!("D-Bus: {missed} app events were not signalled (too many at once)");
                        self.all().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = resync.notified() => self.all().await,
                _ = tick.tick() => self.all().await,
            }
            if self.lost {
                // One line, not one per event from now on.
                return;
            }
        }
    }

    /// Log a failed send; a broken connection ends D-Bus for good.
    fn failed(&mut self, what: &str, e: zbus::Error) {
        if self.lost {
            return;
        }
        if matches!(e, zbus::Error::InputOutput(_)) {
            tracing::error!(
                "D-Bus: lost the bus ({what}: {e}); corrald serves on without D-Bus until it restarts"
            );
            self.lost = true;
        } else {
            tracing::warn!("D-Bus: {what}: {e}");
        }
    }

    async fn signal(&mut self, event: &Event) {
        let sent = async {
            let emitter = SignalEmitter::new(&self.connection, MANAGER_PATH)?;
            interfaces::emit_event(&emitter, event).await
        }
        .await;
        if let Err(e) = sent {
            self.failed(&format!("sending AppStateChanged for {}", event.app), e);
        }
    }

    /// Add objects for new apps, remove those of gone apps, and announce
    /// what changed since last time.
    async fn all(&mut self) {
        let connection = self.connection.clone();
        let server = connection.object_server();
        let apps = self.manager.list_apps();
        let live: BTreeSet<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        let gone: Vec<String> = self
            .apps
            .keys()
            .filter(|name| !live.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.apps.remove(&name);
            if let Err(e) = server.remove::<AppObject, _>(app_path(&name)).await {
                self.failed(&format!("removing the object of {name}"), e);
            }
        }
        for app in &apps {
            let now = emitting(interfaces::app_properties(app), APP_PROPERTIES_EMITTING);
            match self.apps.get(&app.name) {
                None => {
                    let object = AppObject::new(self.manager.clone(), app.name.clone());
                    if let Err(e) = server.at(app_path(&app.name), object).await {
                        self.failed(&format!("adding the object of {}", app.name), e);
                        continue;
                    }
                }
                Some(before) => {
                    let path = app_path(&app.name);
                    let sent =
                        changed(&self.connection, path.as_str(), APP_INTERFACE, before, &now).await;
                    if let Err(e) = sent {
                        self.failed(&format!("PropertiesChanged on {path}"), e);
                        return;
                    }
                }
            }
            self.apps.insert(app.name.clone(), now);
        }
        let daemon = interfaces::manager_emitting(&self.manager.info());
        if !self.daemon.is_empty() {
            let sent = changed(
                &self.connection,
                MANAGER_PATH,
                MANAGER_INTERFACE,
                &self.daemon,
                &daemon,
            )
            .await;
            if let Err(e) = sent {
                return self.failed(&format!("PropertiesChanged on {MANAGER_PATH}"), e);
            }
        }
        self.daemon = emitting(daemon, MANAGER_PROPERTIES_EMITTING);
    }
}

fn emitting(mut props: AppDict, names: &[&str]) -> AppDict {
    props.retain(|k, _| names.contains(k));
    props
}

/// One `PropertiesChanged` with every property that differs, if any.
async fn changed(
    conn: &Connection,
    path: &str,
    interface: &str,
    before: &AppDict,
    now: &AppDict,
) -> zbus::Result<()> {
    let diff: std::collections::HashMap<&str, Variant<'_>> = now
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    if diff.is_empty() {
        return Ok(());
    }
    let emitter = SignalEmitter::new(conn, path)?;
    fdo::Properties::properties_changed(
        &emitter,
        interface.try_into()?,
        diff,
        std::borrow::Cow::Borrowed(&[]),
    )
    .await
}
