//! Command-line options of the load generator.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// What `--help` prints.
pub const USAGE: &str = "\
usage: herald-loadtest --secret S [--option value]...
  (the Makefile's loadtest, chaos and soak targets run it for you)

  --url URLS              edge base URLs, comma-separated (round-robin)
  --admin URLS            the edges' admin listeners (admin.listen), comma-separated,
                          where the report's server-side counters are read
  --api herald|nchan      the server's endpoints: Herald's (also the Express
                          baseline's) or nchan's /pub/<channel>, /sub/<channel>
  --secret S              HS256 secret to mint tokens (or HERALD__AUTH__HS256_SECRET;
                          not needed with --api nchan, which has no authentication)
  --label NAME            scenario name in the report
  --connections N         SSE connections to open
  --users N               distinct users (connection i is user i % N)
  --topic T               every connection follows topic T; events go to it
  --mixed 0|1             with --topic: follow the user and the topic in one stream
  --rate N                events per second, all publishers together
  --duration SECS         seconds of publishing (0: connect, measure, stop)
  --drain SECS            seconds to wait for outstanding deliveries
  --payload BYTES         padding added to each event's data
  --publishers N          parallel publishers
  --nats URLS             publish straight into NATS JetStream at these servers
  --nats-prefix P         subject prefix there (default herald)
  --publish-twice 0|1     publish every event twice with the same Nats-Msg-Id
  --reconnect 0|1         reconnect ended streams with Last-Event-ID, like a browser
  --honor-retry 0|1       wait the retry: the server asked for before reconnecting
  --slow-fraction F       share of connections that never read (0.0 to 1.0)
  --quiet-users N         the last N users get an event only every --quiet-every-secs
  --quiet-every-secs SECS how often a quiet user gets events (default 5)
  --quiet-burst N         events a quiet user gets each time, back to back (default 1)
  --owed N                events each client is owed at connect (replay scenario)
  --source-ips N          spread connections over 127.0.0.1..=127.0.0.N
  --connect-concurrency N connections opened at once
  --pids PIDS             server processes to sample RSS and CPU of
  --bus-pids PIDS         the bus's processes (nats-server), sampled and reported apart
  --out FILE              write the JSON result here
";

/// Which endpoints the server under test speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Herald's: `GET /v1/stream?access_token=…` and `POST /v1/publish` with
    /// a JSON body, both authenticated (the Express + Redis baseline speaks
    /// them too).
    Herald,
    /// nchan's, as `loadtest/baselines/nchan/` configures them: `GET
    /// /sub/<channel>` (EventSource) and `POST /pub/<channel>` whose body is
    /// the message; no authentication. One channel per user or topic.
    Nchan,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario name for the report.
    pub label: String,
    /// Edge node base URLs; connections are spread over them round-robin.
    pub urls: Vec<String>,
    /// Edge admin listener base URLs (`/metrics` for server-side counters);
    /// none: those counters are reported as 0.
    pub admin_urls: Vec<String>,
    /// The endpoints the server speaks.
    pub api: Api,
    /// HS256 secret to mint tokens with.
    pub secret: String,
    /// SSE connections to open.
    pub connections: usize,
    /// Distinct users (connection `i` is user `i % users`).
    pub users: usize,
    /// When set, every connection follows this topic and events go to it.
    pub topic: Option<String>,
    /// With `--topic`: every connection follows its user *and* the topic, and
    /// events go to the users and the topic alike (one stream, two targets,
    /// their events interleaved: checks stream order across targets).
    pub mixed: bool,
    /// Events per second, all publishers together.
    pub rate: u64,
    /// Seconds of publishing (0: connect, measure, and stop).
    pub duration_secs: u64,
    /// Seconds to wait for outstanding deliveries after publishing.
    pub drain_secs: u64,
    /// Padding added to each event's data, bytes.
    pub payload_bytes: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1..=N).
    pub source_ips: u8,
    /// Connections opened at once.
    pub connect_concurrency: usize,
    /// Parallel publishers.
    pub publishers: usize,
    /// Share of connections that never read after connecting (slow consumers).
    pub slow_fraction: f64,
    /// The last this many users are quiet: each gets events only every
    /// `quiet_every_secs` (the other targets share the rest of the rate), so
    /// a live copy lost for one is revealed by no later event of its own for
    /// a while. The report gives their events' longest delay apart. A plain
    /// `--topic` run has no user targets, so none is quiet.
    pub quiet_users: usize,
    /// Seconds between two turns of a quiet user.
    pub quiet_every_secs: u64,
    /// Events a quiet user gets at each turn, back to back: more than the
    /// live buffer holds (`nats.subscription_capacity`) lets a stalled node
    /// drop the last of them, which no later event then reveals.
    pub quiet_burst: u64,
    /// Server process ids to sample RSS and CPU from.
    pub pids: Vec<u32>,
    /// The bus's process ids (nats-server): sampled like `pids` and reported
    /// apart, so a report shows the node alone and the node with its bus.
    pub bus_pids: Vec<u32>,
    /// Replay mode: send every client away, publish this many events to each
    /// target, then bring every client back at once with its `Last-Event-ID`.
    pub owed: Option<u64>,
    /// Reconnect (to the next URL) when a stream ends, like a browser.
    pub reconnect: bool,
    /// Wait the server's `retry:` hint before reconnecting, like a browser.
    pub honor_retry: bool,
    /// Publish straight into NATS JetStream at this URL (as any application
    /// would) instead of `POST /v1/publish`.
    pub nats: Option<String>,
    /// Subject prefix of the Herald stream (`nats.subject_prefix`).
    pub nats_prefix: String,
    /// With `--nats`: send every event a second time with the same
    /// `Nats-Msg-Id` once it is stored (a publisher retrying after a lost
    /// acknowledgement); each must be acknowledged as a duplicate.
    pub publish_twice: bool,
    /// Where to write the JSON result.
    pub out: Option<PathBuf>,
}

impl Options {
    /// Parses `--name value` pairs.
    pub fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
        let mut options = Options {
            label: "adhoc".into(),
            urls: vec!["http://127.0.0.1:8080".into()],
            admin_urls: Vec::new(),
            api: Api::Herald,
            secret: std::env::var("HERALD__AUTH__HS256_SECRET").unwrap_or_default(),
            connections: 1000,
            users: 0,
            topic: None,
            mixed: false,
            rate: 1000,
            duration_secs: 10,
            drain_secs: 5,
            payload_bytes: 0,
            source_ips: 1,
            connect_concurrency: 256,
            publishers: 4,
            slow_fraction: 0.0,
            quiet_users: 0,
            quiet_every_secs: 5,
            quiet_burst: 1,
            pids: Vec::new(),
            bus_pids: Vec::new(),
            owed: None,
            reconnect: false,
            honor_retry: false,
            nats: None,
            nats_prefix: "herald".into(),
            publish_twice: false,
            out: None,
        };
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                print!("{USAGE}");
                std::process::exit(0);
            }
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .with_context(|| format!("{flag}: not a number"))
            };
            match flag.as_str() {
                "--label" => options.label = value,
                "--url" => options.urls = value.split(',').map(str::to_owned).collect(),
                "--admin" => {
                    options.admin_urls = value
                        .split(',')
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "--secret" => options.secret = value,
                "--connections" => options.connections = number(&value)? as usize,
                "--users" => options.users = number(&value)? as usize,
                "--topic" => options.topic = Some(value).filter(|t| !t.is_empty()),
                "--mixed" => options.mixed = number(&value)? != 0,
                "--rate" => options.rate = number(&value)?,
                "--duration" => options.duration_secs = number(&value)?,
                "--drain" => options.drain_secs = number(&value)?,
                "--payload" => options.payload_bytes = number(&value)? as usize,
                "--source-ips" => options.source_ips = number(&value)?.clamp(1, 254) as u8,
                "--connect-concurrency" => {
                    options.connect_concurrency = number(&value)?.max(1) as usize
                }
                "--publishers" => options.publishers = number(&value)?.max(1) as usize,
                "--slow-fraction" => {
                    options.slow_fraction = value.parse().context("--slow-fraction: 0.0 to 1.0")?
                }
                "--quiet-users" => options.quiet_users = number(&value)? as usize,
                "--quiet-every-secs" => options.quiet_every_secs = number(&value)?.max(1),
                "--quiet-burst" => options.quiet_burst = number(&value)?.max(1),
                "--api" => {
                    options.api = match value.as_str() {
                        "herald" => Api::Herald,
                        "nchan" => Api::Nchan,
                        other => bail!("--api: herald or nchan, not {other}"),
                    }
                }
                "--pids" => options.pids = pids(&flag, &value)?,
                "--bus-pids" => options.bus_pids = pids(&flag, &value)?,
                "--out" => options.out = Some(PathBuf::from(value)),
                "--owed" => options.owed = Some(number(&value)?),
                "--reconnect" => options.reconnect = number(&value)? != 0,
                "--honor-retry" => options.honor_retry = number(&value)? != 0,
                "--nats" => options.nats = Some(value).filter(|v| !v.is_empty()),
                "--nats-prefix" => options.nats_prefix = value,
                "--publish-twice" => options.publish_twice = number(&value)? != 0,
                other => bail!("unknown option {other} (--help lists them)"),
            }
        }
        if options.secret.is_empty() && options.api == Api::Herald {
            bail!("give --secret or set HERALD__AUTH__HS256_SECRET");
        }
        if options.api == Api::Nchan && options.nats.is_some() {
            bail!("--api nchan publishes to nchan's /pub/<channel>, not --nats");
        }
        if options.api == Api::Nchan && options.mixed {
            bail!("--api nchan: one channel per stream, so no --mixed");
        }
        if options.publish_twice && options.nats.is_none() {
            bail!("--publish-twice needs --nats");
        }
        if options.users == 0 || options.users > options.connections {
            options.users = options.connections.max(1);
        }
        if options.mixed && options.topic.is_none() {
            bail!("--mixed needs --topic");
        }
        if options.quiet_users > options.users {
            bail!(
                "--quiet-users {} is more than the {} users",
                options.quiet_users,
                options.users
            );
        }
        if options.topic.is_some() && !options.mixed {
            // One ordered sequence per topic needs one publisher.
            options.publishers = 1;
        }
        options.publishers = options.publishers.min(options.users);
        Ok(options)
    }
}

/// The nchan channel of `topic`, or else of the user numbered `target`.
pub fn nchan_channel(topic: Option<&str>, target: usize) -> String {
    match topic {
        Some(topic) => format!("topic.{topic}"),
        None => format!("user.{}", Options::user_name(target)),
    }
}

/// Process ids, comma-separated.
fn pids(flag: &str, value: &str) -> anyhow::Result<Vec<u32>> {
    value
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().with_context(|| format!("{flag}: process ids")))
        .collect()
}

impl Options {
    /// How many targets events are published to: every user, the topic, or
    /// both (`--mixed`: the topic is the last target, numbered `users`).
    pub fn targets(&self) -> usize {
        match (&self.topic, self.mixed) {
            (None, _) => self.users,
            (Some(_), false) => 1,
            (Some(_), true) => self.users + 1,
        }
    }

    /// The topic events for `target` go to (`None`: the target is a user).
    pub fn topic_of(&self, target: usize) -> Option<&str> {
        match (&self.topic, self.mixed) {
            (Some(topic), false) => Some(topic),
            (Some(topic), true) if target == self.users => Some(topic),
            _ => None,
        }
    }

    /// The name of `target`'s user (`lt-u<index>`); the topic has none.
    pub fn user_name(target: usize) -> String {
        format!("lt-u{target}")
    }

    /// The nchan channel `target`'s events go to and its streams read:
    /// `user.lt-u<index>` or `topic.<topic>`.
    pub fn nchan_channel(&self, target: usize) -> String {
        nchan_channel(self.topic_of(target), target)
    }

    /// Whether `target` is a quiet user (one of the last `quiet_users`).
    pub fn is_quiet(&self, target: usize) -> bool {
        target < self.users
            && target >= self.users - self.quiet_users
            && self.topic_of(target).is_none()
    }

    /// The targets whose events a connection of `user` receives.
    pub fn targets_of(&self, user: usize) -> Vec<usize> {
        match (&self.topic, self.mixed) {
            (None, _) => vec![user],
            (Some(_), false) => vec![0],
            (Some(_), true) => vec![user, self.users],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let mut all = vec!["--secret", "s"];
        all.extend_from_slice(args);
        Options::parse(all.into_iter().map(str::to_owned)).expect("valid options")
    }

    #[test]
    fn every_option_the_usage_lists_is_accepted() {
        let listed: Vec<&str> = USAGE
            .lines()
            .filter_map(|line| line.trim_start().strip_prefix("--"))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        assert!(
            listed.len() >= 20,
            "the usage lists the options: {listed:?}"
        );
        for name in listed {
            let flag = format!("--{name}");
            let value = if name == "api" { "herald" } else { "1" };
            let all = [
                "--secret",
                "s",
                "--nats",
                "n",
                "--topic",
                "t",
                flag.as_str(),
                value,
            ];
            Options::parse(all.into_iter().map(str::to_owned))
                .unwrap_or_else(|err| panic!("{flag} is listed but refused: {err:#}"));
        }
    }

    #[test]
    fn mixed_connections_follow_their_user_and_the_topic_which_is_the_last_target() {
        let options = parse(&["--connections", "10", "--topic", "news", "--mixed", "1"]);
        assert_eq!(options.targets(), 11);
        assert_eq!(options.targets_of(3), vec![3, 10]);
        assert_eq!(options.topic_of(10), Some("news"));
        assert_eq!(options.topic_of(3), None);
        assert_eq!(
            options.publishers, 4,
            "users and the topic spread over publishers"
        );
    }

    #[test]
    fn quiet_users_are_the_last_users_and_never_the_topic() {
        let options = parse(&[
            "--connections",
            "20",
            "--users",
            "10",
            "--quiet-users",
            "3",
            "--topic",
            "news",
            "--mixed",
            "1",
        ]);
        let quiet: Vec<usize> = (0..options.targets())
            .filter(|&t| options.is_quiet(t))
            .collect();
        assert_eq!(quiet, vec![7, 8, 9]);
        assert_eq!(options.quiet_every_secs, 5);
        let too_many = ["--secret", "s", "--users", "2", "--connections", "2"];
        let too_many = too_many.into_iter().chain(["--quiet-users", "3"]);
        assert!(Options::parse(too_many.map(str::to_owned)).is_err());
    }

    #[test]
    fn a_plain_topic_run_has_one_target_and_one_publisher() {
        let options = parse(&["--connections", "10", "--topic", "news"]);
        assert_eq!((options.targets(), options.publishers), (1, 1));
        assert_eq!(options.targets_of(7), vec![0]);
        assert_eq!(options.topic_of(0), Some("news"));
        assert!(
            Options::parse(
                ["--secret", "s", "--mixed", "1"]
                    .into_iter()
                    .map(str::to_owned)
            )
            .is_err()
        );
    }

    #[test]
    fn nchan_needs_no_secret_and_names_one_channel_per_user_or_topic() {
        let parse_nchan = |extra: &[&str]| {
            let args = ["--api", "nchan", "--connections", "10"]
                .iter()
                .chain(extra);
            Options::parse(args.map(|a| a.to_string()))
        };
        let options = parse_nchan(&[]).expect("no secret needed");
        assert_eq!(options.api, Api::Nchan);
        assert_eq!(options.nchan_channel(7), "user.lt-u7");
        let broadcast = parse_nchan(&["--topic", "news"]).expect("a topic");
        assert_eq!(broadcast.nchan_channel(0), "topic.news");
        assert!(parse_nchan(&["--topic", "news", "--mixed", "1"]).is_err());
        assert!(parse_nchan(&["--nats", "nats://127.0.0.1:4222"]).is_err());
        assert!(parse_nchan(&["--api", "grpc"]).is_err());
        let herald = Options::parse(["--connections", "10"].into_iter().map(str::to_owned));
        assert!(herald.is_err() || std::env::var("HERALD__AUTH__HS256_SECRET").is_ok());
    }

    #[test]
    fn bus_processes_are_read_apart_from_the_servers() {
        let options = parse(&["--pids", "10,11", "--bus-pids", "12"]);
        assert_eq!((options.pids, options.bus_pids), (vec![10, 11], vec![12]));
    }
}
