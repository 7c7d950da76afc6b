//! The Redis bus: pub/sub over two connections of the `redis` crate, one
//! multiplexed connection that publishes (pipelined batches, one at a time,
//! so in order) and one subscribed connection (RESP2 pub/sub) that receives.

use std::time::Duration;

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Client, Msg};
use futures_util::future::try_join_all;
use futures_util::StreamExt;

use super::{Bus, Message, Outbound, Publish, Receive, Subscribe, Topic};

/// Channels per SUBSCRIBE or UNSUBSCRIBE command; the commands of one
/// batch are all sent before the first confirmation is awaited.
const CHANNELS_PER_COMMAND: usize = 1024;

pub(crate) struct Redis {
    client: Client,
    /// For the log: redis://host:port, without a password.
    address: String,
}

impl Redis {
    pub(crate) fn new(url: &str) -> Result<Redis, String> {
        let client = Client::open(url).map_err(|e| format!("--cluster {url}: {e}"))?;
        let address = format!("redis://{}", client.get_connection_info().addr());
        Ok(Redis { client, address })
    }
}

impl Bus for Redis {
    type Publisher = Publisher;
    type Subscriber = Subscriber;
    type Receiver = Receiver;

    fn address(&self) -> &str {
        &self.address
    }

    async fn connect(&self) -> Result<(Publisher, Subscriber, Receiver), String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // The bridge puts its own limits on the replies it waits for.
            .set_response_timeout(None);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| e.to_string())?;
        let (sink, stream) = pubsub.split();
        Ok((
            Publisher {
                conn,
                channel: String::new(),
            },
            Subscriber { sink },
            Receiver { stream },
        ))
    }
}

pub(crate) struct Publisher {
    conn: MultiplexedConnection,
    /// Reused to spell each uid's channel.
    channel: String,
}

impl Publish for Publisher {
    async fn publish(&mut self, batch: &[Outbound]) -> Result<(), String> {
        let mut pipe = ::redis::pipe();
        for out in batch {
            let channel = match out.topic() {
                Topic::All => super::ALL_CHANNEL,
                Topic::Uid(uid) => {
                    self.channel.clear();
                    self.channel.push_str(super::UID_CHANNEL_PREFIX);
                    self.channel.push_str(uid);
                    &self.channel
                }
            };
            // `arg` copies: the channel buffer can be reused at once.
            pipe.cmd("PUBLISH")
                .arg(channel)
                .arg(out.envelope())
                .ignore();
        }
        pipe.exec_async(&mut self.conn)
            .await
            .map_err(|e| e.to_string())
    }
}

pub(crate) struct Subscriber {
    sink: PubSubSink,
}

impl Subscriber {
    async fn each_chunk(&mut self, topics: &[Topic<'_>], subscribe: bool) -> Result<(), String> {
        let channels: Vec<String> = topics.iter().map(|t| t.channel()).collect();
        let commands = channels.chunks(CHANNELS_PER_COMMAND).map(|chunk| {
            let mut sink = self.sink.clone();
            async move {
                if subscribe {
                    sink.subscribe(chunk).await
                } else {
                    sink.unsubscribe(chunk).await
                }
            }
        });
        try_join_all(commands)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

impl Subscribe for Subscriber {
    async fn subscribe(&mut self, topics: &[Topic<'_>]) -> Result<(), String> {
        self.each_chunk(topics, true).await
    }

    async fn unsubscribe(&mut self, topics: &[Topic<'_>]) -> Result<(), String> {
        self.each_chunk(topics, false).await
    }

    async fn ping(&mut self) -> Result<(), String> {
        self.sink
            .ping::<::redis::Value>()
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

pub(crate) struct Receiver {
    stream: PubSubStream,
}

impl Receive for Receiver {
    type Message = Msg;

    async fn next(&mut self) -> Option<Msg> {
        self.stream.next().await
    }
}

impl Message for Msg {
    fn topic(&self) -> Option<Topic<'_>> {
        Topic::of_channel(self.get_channel_name())
    }

    fn payload(&self) -> &[u8] {
        self.get_payload_bytes()
    }
}
