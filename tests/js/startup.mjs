// Element Web's start-up path, driven through matrix-js-sdk (the SDK Element Web runs) against a
// Lattice server. Run by tests/interop/js_sdk.sh, which starts the server and passes:
//   LATTICE_URL       the client API base URL (http://127.0.0.x:port)
//   ALICE_PASSWORD    password of @alice, created with `lattice user create`
//   REGISTRATION_TOKEN a one-use registration token, created with `lattice registration-token create`
// Each check prints "ok" or "FAIL"; the run ends with "js-sdk: N passed, N failed" and exits
// non-zero on any failure. SDK_LOG=debug shows the SDK's own logging.
import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

const {
  ClientEvent,
  Direction,
  EventType,
  NotificationCountType,
  RoomMemberEvent,
  SyncState,
  createClient,
} = sdk;

const BASE_URL = mustEnv("LATTICE_URL");
const ALICE_PASSWORD = mustEnv("ALICE_PASSWORD");
const REGISTRATION_TOKEN = mustEnv("REGISTRATION_TOKEN");
const BOB_PASSWORD = "a long bob password for the sdk check";
// How long one wait for the server may take before the check fails (a guard, not a measurement).
const WAIT_MS = Number(process.env.SDK_WAIT_MS ?? 30000);

// The SDK logs through `console` from many child loggers, each created at debug level; unless
// SDK_LOG asks for them, those lines are dropped and this script writes its own to stdout.
if (process.env.SDK_LOG) {
  logger.setLevel(process.env.SDK_LOG);
} else {
  for (const method of ["log", "debug", "info", "warn", "error", "trace"]) console[method] = () => {};
}

function say(line) {
  process.stdout.write(`${line}\n`);
}

function mustEnv(name) {
  const value = process.env[name];
  if (!value) {
    process.stderr.write(`${name} is not set\n`);
    process.exit(2);
  }
  return value;
}

// --- Checks ----------------------------------------------------------------------------------
let passed = 0;
let failed = 0;

class CheckFailed extends Error {}

function expect(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

function equal(actual, wanted, what) {
  const a = JSON.stringify(actual);
  const w = JSON.stringify(wanted);
  expect(a === w, `${what}: got ${a}, want ${w}`);
}

// One named check; `essential` ones stop the run, since everything after them depends on them.
async function check(name, body, { essential = false } = {}) {
  const started = performance.now();
  try {
    await body();
    say(`ok   ${name} (${Math.round(performance.now() - started)} ms)`);
    passed += 1;
  } catch (error) {
    const detail = error instanceof CheckFailed ? error.message : describeError(error);
    say(`FAIL ${name}: ${detail}`);
    failed += 1;
    if (essential) finish();
  }
}

function describeError(error) {
  if (error?.errcode) return `${error.httpStatus} ${error.errcode}: ${error.data?.error ?? error.message}`;
  return error?.stack ?? String(error);
}

// Polls `condition` until it holds (sync results arrive asynchronously).
async function waitFor(condition, what) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new CheckFailed(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

// --- Every request the SDK makes, with its answer, so start-up failures that the SDK swallows
// (it retries or falls back quietly) are seen too. -------------------------------------------
const requests = [];

function recordingFetch(who) {
  return async (input, init) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const method = init?.method ?? "GET";
    const response = await fetch(input, init);
    let errcode;
    if (response.status >= 400) {
      errcode = await response
        .clone()
        .json()
        .then((body) => body.errcode)
        .catch(() => undefined);
    }
    requests.push({ who, method, path: url.pathname, status: response.status, errcode });
    return response;
  };
}

function newClient(who, extra = {}) {
  return createClient({ baseUrl: BASE_URL, fetchFn: recordingFetch(who), ...extra });
}

// Element's start options (MatrixClientPeg): lazy-loaded members, threads, a 20-event initial
// timeline, detached pending events.
const ELEMENT_START = {
  initialSyncLimit: 20,
  lazyLoadMembers: true,
  threadSupport: true,
  pendingEventOrdering: "detached",
};

async function startAndWaitForSync(client) {
  const prepared = new Promise((resolve, reject) => {
    const onSync = (state, _previous, data) => {
      if (state === SyncState.Prepared || state === SyncState.Syncing) {
        client.off(ClientEvent.Sync, onSync);
        resolve();
      } else if (state === SyncState.Error) {
        client.off(ClientEvent.Sync, onSync);
        reject(new CheckFailed(`sync failed: ${describeError(data?.error)}`));
      }
    };
    client.on(ClientEvent.Sync, onSync);
  });
  await client.startClient(ELEMENT_START);
  const timeout = new Promise((_, reject) =>
    setTimeout(() => reject(new CheckFailed("no PREPARED sync state")), WAIT_MS).unref(),
  );
  await Promise.race([prepared, timeout]);
}

async function passwordLogin(user, password, deviceName) {
  const anonymous = newClient(user);
  const response = await anonymous.loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user },
    password,
    initial_device_display_name: deviceName,
  });
  return newClient(user, {
    accessToken: response.access_token,
    userId: response.user_id,
    deviceId: response.device_id,
    timelineSupport: true,
  });
}

function timelineEvents(room) {
  return room.getLiveTimeline().getEvents();
}

function findByBody(room, body) {
  return timelineEvents(room).find((event) => event.getContent().body === body);
}

// --- The scenario ------------------------------------------------------------------------------
const ROOM_NAME = "Lattice SDK check";
const ALICE_NAME = "Alice Lattice";
const BOB_NAME = "Bob Builder";
const MENTION_BODY = `${ALICE_NAME}: please look at this`;
const PLAIN_BODY = "and a plain message";

let alice;
let bob;
let aliceId;
let bobId;
let roomId;
let mentionEvent;
let plainEvent;

await check("GET /versions: the Matrix versions the SDK needs, and unstable_features", async () => {
  const versions = await newClient("anonymous").getVersions();
  expect(Array.isArray(versions.versions), "versions is not a list");
  expect(versions.versions.includes("v1.1"), `v1.1 (the SDK's minimum) missing from ${versions.versions}`);
  expect(versions.versions.includes("v1.11"), `v1.11 (authenticated media) missing from ${versions.versions}`);
  expect(
    typeof versions.unstable_features === "object" && versions.unstable_features !== null,
    "unstable_features is not an object",
  );
});

await check("GET /login offers m.login.password", async () => {
  const { flows } = await newClient("anonymous").loginFlows();
  expect(
    flows.some((flow) => flow.type === "m.login.password"),
    `flows: ${JSON.stringify(flows)}`,
  );
});

await check("Element's login page: no OAuth 2.0 delegation (auth_metadata answers 404 M_UNRECOGNIZED)", async () => {
  const error = await newClient("anonymous")
    .getAuthMetadata()
    .then(() => null)
    .catch((e) => e);
  expect(error, "auth_metadata answered, but this server has no OAuth 2.0 provider");
  equal([error.httpStatus, error.errcode], [404, "M_UNRECOGNIZED"], "auth_metadata's answer");
});

await check(
  "alice logs in with m.login.password / m.id.user",
  async () => {
    alice = await passwordLogin("alice", ALICE_PASSWORD, "Element SDK check");
    aliceId = alice.getUserId();
    expect(aliceId?.startsWith("@alice:"), `user_id ${aliceId}`);
    expect(alice.getDeviceId(), "no device_id");
  },
  { essential: true },
);

await check(
  "alice's client starts (push rules, filter, lazy-loaded members) and reaches PREPARED",
  async () => {
    await startAndWaitForSync(alice);
    const rules = alice.pushRules;
    expect(rules?.global, "the SDK has no push rules after start (GET /pushrules/ failed)");
    expect(
      rules.global.override?.some((rule) => rule.rule_id === ".m.rule.master"),
      "no .m.rule.master override rule",
    );
    expect(
      rules.global.override?.some((rule) => rule.rule_id === ".m.rule.is_user_mention"),
      "no .m.rule.is_user_mention override rule",
    );
  },
  { essential: true },
);

await check("the sync filter the SDK created reads back (GET /user/{userId}/filter/{filterId})", async () => {
  const filterId = alice.store.getFilterIdByName?.(`FILTER_SYNC_${aliceId}`);
  const created = await alice.createFilter({ room: { state: { lazy_load_members: true } } });
  expect(created.filterId, "POST /user/{userId}/filter returned no filter_id");
  const read = await alice.getFilter(aliceId, created.filterId, false);
  equal(read.getDefinition().room?.state?.lazy_load_members, true, "lazy_load_members read back");
  // The in-memory store does not remember the sync filter; when it does, it must read back too.
  if (filterId) await alice.getFilter(aliceId, filterId, false);
});

await check("bob registers with a registration token (UIA m.login.registration_token)", async () => {
  const anonymous = newClient("bob");
  expect(await anonymous.isUsernameAvailable("bob"), "bob is not available");
  let session;
  try {
    await anonymous.registerRequest({ username: "bob", password: BOB_PASSWORD });
    throw new CheckFailed("registration without auth succeeded");
  } catch (error) {
    if (error instanceof CheckFailed) throw error;
    equal(error.httpStatus, 401, "status of the first /register");
    const flows = error.data?.flows ?? [];
    expect(
      flows.some((flow) => flow.stages?.includes("m.login.registration_token")),
      `flows: ${JSON.stringify(flows)}`,
    );
    session = error.data.session;
    expect(session, "no UIA session");
  }
  const validity = await anonymous.http.request(
    "GET",
    "/register/m.login.registration_token/validity",
    { token: REGISTRATION_TOKEN },
    undefined,
    { prefix: "/_matrix/client/v1" },
  );
  equal(validity.valid, true, "token validity");
  const registered = await anonymous.registerRequest({
    username: "bob",
    password: BOB_PASSWORD,
    initial_device_display_name: "bob's SDK",
    auth: { type: "m.login.registration_token", token: REGISTRATION_TOKEN, session },
  });
  bob = newClient("bob", {
    accessToken: registered.access_token,
    userId: registered.user_id,
    deviceId: registered.device_id,
  });
  bobId = registered.user_id;
  expect(bobId?.startsWith("@bob:"), `user_id ${bobId}`);
  const whoami = await bob.whoami();
  equal(whoami.user_id, bobId, "whoami user_id");
}, { essential: true });

await check("start-up reads Element makes: capabilities, TURN, third-party protocols, 3PIDs, devices, media config", async () => {
  const capabilities = await alice.getCapabilities();
  const versions = capabilities["m.room_versions"];
  expect(versions?.default, `m.room_versions.default missing: ${JSON.stringify(capabilities)}`);
  expect(versions.available?.[versions.default] === "stable", `default room version ${versions.default} not stable`);
  equal(capabilities["m.change_password"]?.enabled, true, "m.change_password.enabled");
  const turn = await alice.turnServer().catch((error) => error);
  // Without a TURN configuration the spec's answer is an empty object; with one, uris and ttl.
  expect(!(turn instanceof Error), `GET /voip/turnServer: ${describeError(turn)}`);
  expect(turn.uris === undefined || Array.isArray(turn.uris), `turnServer: ${JSON.stringify(turn)}`);
  const protocols = await alice.getThirdpartyProtocols();
  expect(typeof protocols === "object", `thirdparty/protocols: ${JSON.stringify(protocols)}`);
  const { threepids } = await alice.getThreePids();
  expect(Array.isArray(threepids), "account/3pid threepids is not a list");
  const { devices } = await alice.getDevices();
  const mine = devices.find((device) => device.device_id === alice.getDeviceId());
  equal(mine?.display_name, "Element SDK check", "this device's display name");
  const media = await alice.getMediaConfig(true);
  expect(Number(media["m.upload.size"]) > 0, `media config: ${JSON.stringify(media)}`);
});

await check("alice sets her display name; getProfileInfo reads it back", async () => {
  await alice.setDisplayName(ALICE_NAME);
  const profile = await bob.getProfileInfo(aliceId);
  equal(profile.displayname, ALICE_NAME, "alice's display name seen by bob");
});

await check(
  "bob creates a named room and invites alice; alice sees the invite and joins through the SDK",
  async () => {
    ({ room_id: roomId } = await bob.createRoom({ name: ROOM_NAME, preset: "private_chat" }));
    await bob.invite(roomId, aliceId);
    const invited = await waitFor(() => {
      const room = alice.getRoom(roomId);
      return room?.getMyMembership() === "invite" ? room : null;
    }, "the invite in alice's sync");
    equal(invited.name, ROOM_NAME, "the invited room's name (from invite_state)");
    await alice.joinRoom(roomId);
    await waitFor(() => alice.getRoom(roomId)?.getMyMembership() === "join", "alice's join in her sync");
  },
  { essential: true },
);

await check("the room's name and members as Element shows them (summary, lazy-loaded members)", async () => {
  const room = alice.getRoom(roomId);
  equal(room.name, ROOM_NAME, "room name");
  equal(room.getJoinedMemberCount(), 2, "joined member count (m.joined_member_count)");
  await room.loadMembersIfNeeded();
  const joined = room
    .getJoinedMembers()
    .map((member) => member.userId)
    .sort();
  equal(joined, [aliceId, bobId].sort(), "joined members after /members");
  equal(room.getMember(aliceId)?.name, ALICE_NAME, "alice's member name");
});

await check("a mention and a plain message: unread total=2, highlight=1", async () => {
  // As Element sends a mention: the display name in the body, a pill in formatted_body, and
  // m.mentions naming the user.
  const mention = await bob.sendMessage(roomId, {
    msgtype: "m.text",
    body: MENTION_BODY,
    format: "org.matrix.custom.html",
    formatted_body: `<a href="https://matrix.to/#/${aliceId}">${ALICE_NAME}</a>: please look at this`,
    "m.mentions": { user_ids: [aliceId] },
  });
  const plain = await bob.sendMessage(roomId, { msgtype: "m.text", body: PLAIN_BODY, "m.mentions": {} });
  const room = alice.getRoom(roomId);
  mentionEvent = await waitFor(() => findByBody(room, MENTION_BODY), "the mention in alice's timeline");
  plainEvent = await waitFor(() => findByBody(room, PLAIN_BODY), "the plain message in alice's timeline");
  equal(mentionEvent.getId(), mention.event_id, "the mention's event ID");
  equal(plainEvent.getId(), plain.event_id, "the plain message's event ID");
  await waitFor(
    () =>
      room.getUnreadNotificationCount(NotificationCountType.Total) === 2 &&
      room.getUnreadNotificationCount(NotificationCountType.Highlight) === 1,
    `counts total=2 highlight=1 (have total=${room.getUnreadNotificationCount(
      NotificationCountType.Total,
    )} highlight=${room.getUnreadNotificationCount(NotificationCountType.Highlight)})`,
  ).catch((error) => {
    throw new CheckFailed(
      `${error.message}; now total=${room.getUnreadNotificationCount(NotificationCountType.Total)} ` +
        `highlight=${room.getUnreadNotificationCount(NotificationCountType.Highlight)}`,
    );
  });
  const actions = alice.getPushActionsForEvent(mentionEvent);
  equal(actions?.tweaks?.highlight, true, "the SDK's own push evaluation highlights the mention");
});

await check("the timeline holds both messages in order with their senders", async () => {
  const room = alice.getRoom(roomId);
  const events = timelineEvents(room);
  const mentionAt = events.findIndex((event) => event.getId() === mentionEvent.getId());
  const plainAt = events.findIndex((event) => event.getId() === plainEvent.getId());
  expect(mentionAt >= 0 && plainAt > mentionAt, `positions ${mentionAt}, ${plainAt}`);
  equal(mentionEvent.getSender(), bobId, "the mention's sender");
  equal(plainEvent.getSender(), bobId, "the plain message's sender");
  equal(mentionEvent.sender?.userId, bobId, "the mention's sender member");
});

await check("a threaded read receipt from the SDK: counts go to 0 on the next sync", async () => {
  const room = alice.getRoom(roomId);
  await alice.sendReadReceipt(plainEvent);
  await waitFor(
    () =>
      room.getUnreadNotificationCount(NotificationCountType.Total) === 0 &&
      room.getUnreadNotificationCount(NotificationCountType.Highlight) === 0,
    "counts 0 after the receipt",
  );
  // The server's own answer, not the SDK's local echo: a fresh /sync shows zero counts too.
  const fresh = await alice.http.authedRequest("GET", "/sync", { timeout: "0" });
  const counts = fresh.rooms?.join?.[roomId]?.unread_notifications;
  equal(counts, { highlight_count: 0, notification_count: 0 }, "unread_notifications in a fresh /sync");
  const receipt = room.getReadReceiptForUserId(aliceId);
  equal(receipt?.eventId, plainEvent.getId(), "alice's receipt in the room");
});

await check("bob's read receipt reaches alice's client (m.receipt)", async () => {
  await bob.sendReadReceipt(plainEvent);
  const room = alice.getRoom(roomId);
  await waitFor(() => room.getEventReadUpTo(bobId) === plainEvent.getId(), "bob's receipt");
});

await check("typing: bob's typing shows on alice's client and stops", async () => {
  const room = alice.getRoom(roomId);
  await bob.sendTyping(roomId, true, 30000);
  await waitFor(() => room.getMember(bobId)?.typing === true, "bob typing");
  await bob.sendTyping(roomId, false, 0);
  await waitFor(() => room.getMember(bobId)?.typing === false, "bob no longer typing");
});

await check("bob changes his display name; alice's client shows it in the room and the profile", async () => {
  const room = alice.getRoom(roomId);
  const named = new Promise((resolve) => {
    const onName = (_event, member) => {
      if (member.userId === bobId && member.name === BOB_NAME) {
        alice.off(RoomMemberEvent.Name, onName);
        resolve();
      }
    };
    alice.on(RoomMemberEvent.Name, onName);
  });
  await bob.setDisplayName(BOB_NAME);
  await waitFor(() => room.getMember(bobId)?.name === BOB_NAME, "bob's new member name");
  await named;
  equal((await alice.getProfileInfo(bobId)).displayname, BOB_NAME, "bob's profile display name");
});

await check("a second device starts fresh: its initial sync has the history, zero counts, and pages back", async () => {
  const second = await passwordLogin("alice", ALICE_PASSWORD, "second SDK device");
  second.timelineSupport = true;
  try {
    await second.startClient({ ...ELEMENT_START, initialSyncLimit: 1 });
    await waitFor(() => second.getRoom(roomId), "the room on the second device");
    const room = second.getRoom(roomId);
    equal(room.name, ROOM_NAME, "room name on the second device");
    equal(room.getUnreadNotificationCount(NotificationCountType.Total), 0, "total count on the second device");
    equal(room.getUnreadNotificationCount(NotificationCountType.Highlight), 0, "highlight count on the second device");
    // Element's back-pagination: /messages from the timeline's start until both messages show.
    for (let page = 0; page < 10 && !findByBody(room, MENTION_BODY); page += 1) {
      await second.scrollback(room, 30);
    }
    const mention = findByBody(room, MENTION_BODY);
    expect(mention, "the mention not found by paging back");
    equal(mention.getSender(), bobId, "the mention's sender after paging back");
    // Jumping to an event (a permalink, the read marker) loads its context: GET /context.
    const jumped = await second.getEventTimeline(room.getUnfilteredTimelineSet(), plainEvent.getId());
    expect(jumped?.getEvents().some((event) => event.getId() === plainEvent.getId()), "the plain message's context");
    const page = await second.createMessagesRequest(roomId, null, 5, Direction.Backward);
    expect(page.chunk?.length > 0 && page.start, `a /messages page: ${JSON.stringify(page).slice(0, 200)}`);
  } finally {
    second.stopClient();
  }
});

await check("a threaded reply mentioning alice: thread counts, then a threaded receipt clears them", async () => {
  const room = alice.getRoom(roomId);
  const rootId = plainEvent.getId();
  const { event_id: replyId } = await bob.sendMessage(roomId, null, {
    msgtype: "m.text",
    body: `${ALICE_NAME}: in a thread`,
    "m.mentions": { user_ids: [aliceId] },
    "m.relates_to": { rel_type: "m.thread", event_id: rootId, is_falling_back: true, "m.in_reply_to": { event_id: rootId } },
  });
  const reply = await waitFor(() => room.findEventById(replyId), "the threaded reply on alice's client");
  equal(reply.threadRootId, rootId, "the reply's thread root");
  await waitFor(
    () =>
      room.getThreadUnreadNotificationCount(rootId, NotificationCountType.Total) === 1 &&
      room.getThreadUnreadNotificationCount(rootId, NotificationCountType.Highlight) === 1,
    "thread counts total=1 highlight=1 (unread_thread_notifications)",
  );
  equal(room.getRoomUnreadNotificationCount(NotificationCountType.Total), 0, "the main timeline's count");
  await alice.sendReadReceipt(reply);
  await waitFor(
    () => room.getThreadUnreadNotificationCount(rootId, NotificationCountType.Total) === 0,
    "the thread's count cleared by the threaded receipt",
  );
  const { chunk } = await alice.http.authedRequest("GET", `/rooms/${encodeURIComponent(roomId)}/threads`, undefined, undefined, {
    prefix: "/_matrix/client/v1",
  });
  expect(
    chunk?.some((root) => root.event_id === rootId),
    `GET /threads lists the root: ${JSON.stringify(chunk).slice(0, 300)}`,
  );
});

await check("Element's notification panel (GET /notifications) lists the mention as a highlight", async () => {
  const { notifications } = await alice.http.authedRequest("GET", "/notifications", { limit: "20" });
  const mention = notifications?.find((n) => n.event?.event_id === mentionEvent.getId());
  expect(mention, `the mention is not among ${notifications?.length} notifications`);
  expect(
    mention.actions?.some((action) => action?.set_tweak === "highlight" && action.value !== false),
    `the mention's actions: ${JSON.stringify(mention.actions)}`,
  );
  equal(mention.room_id, roomId, "the notification's room");
});

await check("search, the user directory and joined rooms", async () => {
  const results = await alice.searchRoomEvents({ term: "plain" });
  expect(
    results.results.some((result) => result.context.getEvent().getId() === plainEvent.getId()),
    `search for "plain" found ${results.results.length} results, not the plain message`,
  );
  const { results: users } = await alice.searchUserDirectory({ term: "bob" });
  expect(
    users.some((user) => user.user_id === bobId),
    `user directory: ${JSON.stringify(users)}`,
  );
  const { joined_rooms: joined } = await alice.getJoinedRooms();
  expect(joined.includes(roomId), `joined_rooms: ${joined}`);
});

await check("an avatar: upload, set, seen in bob's profile lookup, downloaded with authentication", async () => {
  const png = Buffer.from(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==",
    "base64",
  );
  const { content_uri: mxc } = await alice.uploadContent(new Blob([png], { type: "image/png" }), { name: "avatar.png" });
  expect(mxc?.startsWith("mxc://"), `content_uri ${mxc}`);
  await alice.setAvatarUrl(mxc);
  equal((await bob.getProfileInfo(aliceId)).avatar_url, mxc, "alice's avatar_url seen by bob");
  const url = bob.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
  const response = await fetch(url, { headers: { Authorization: `Bearer ${bob.getAccessToken()}` } });
  equal(response.status, 200, `GET ${new URL(url).pathname}`);
  equal(Buffer.from(await response.arrayBuffer()).equals(png), true, "the downloaded bytes");
});

await check("redaction: bob's redacted message is redacted on alice's client", async () => {
  const room = alice.getRoom(roomId);
  const { event_id: eventId } = await bob.sendMessage(roomId, { msgtype: "m.text", body: "a mistake" });
  await waitFor(() => room.findEventById(eventId), "the message to redact");
  await bob.redactEvent(roomId, eventId, undefined, { reason: "typo" });
  await waitFor(() => room.findEventById(eventId)?.isRedacted(), "the redaction applied");
  const redacted = room.findEventById(eventId);
  equal(redacted.getContent(), {}, "the redacted event's content");
  const fetched = await alice.fetchRoomEvent(roomId, eventId);
  equal(fetched.content, {}, "the redacted event from GET /rooms/{roomId}/event/{eventId}");
  expect(fetched.unsigned?.redacted_because, "no unsigned.redacted_because on the fetched event");
});

await check("an edit and a reaction, as Element sends them, shown on the other client", async () => {
  const room = alice.getRoom(roomId);
  const { event_id: originalId } = await bob.sendMessage(roomId, { msgtype: "m.text", body: "teh first draft" });
  const original = await waitFor(() => room.findEventById(originalId), "the message to edit");
  const { event_id: editId } = await bob.sendMessage(roomId, {
    msgtype: "m.text",
    body: "* the first draft",
    "m.new_content": { msgtype: "m.text", body: "the first draft" },
    "m.relates_to": { rel_type: "m.replace", event_id: originalId },
  });
  await waitFor(() => original.replacingEventId() === editId, "the edit applied to the original");
  equal(original.getContent().body, "the first draft", "the edited body");
  await alice.sendEvent(roomId, "m.reaction", {
    "m.relates_to": { rel_type: "m.annotation", event_id: originalId, key: "👍" },
  });
  // Bob's client is not syncing: the reaction is read as Element's thread and relation views do.
  const { chunk } = await bob.http.authedRequest(
    "GET",
    `/rooms/${encodeURIComponent(roomId)}/relations/${encodeURIComponent(originalId)}/m.annotation`,
    undefined,
    undefined,
    { prefix: "/_matrix/client/v1" },
  );
  expect(
    chunk?.some((event) => event.sender === aliceId && event.content?.["m.relates_to"]?.key === "👍"),
    `relations: ${JSON.stringify(chunk).slice(0, 300)}`,
  );
});

await check("muting a room (Element's override push rule): its messages stop counting until unmuted", async () => {
  const room = alice.getRoom(roomId);
  await alice.sendReadReceipt(timelineEvents(room).at(-1));
  await waitFor(() => room.getUnreadNotificationCount(NotificationCountType.Total) === 0, "counts 0 before muting");
  await alice.addPushRule("global", "override", roomId, {
    conditions: [{ kind: "event_match", key: "room_id", pattern: roomId }],
    actions: [],
  });
  await waitFor(
    () => alice.pushRules?.global?.override?.some((rule) => rule.rule_id === roomId),
    "the mute rule in alice's push rules (m.push_rules account data in sync)",
  );
  const { event_id: mutedId } = await bob.sendMessage(roomId, { msgtype: "m.text", body: "while muted" });
  await waitFor(() => room.findEventById(mutedId), "the message sent while muted");
  equal(room.getUnreadNotificationCount(NotificationCountType.Total), 0, "count while muted");
  await alice.deletePushRule("global", "override", roomId);
  await bob.sendMessage(roomId, { msgtype: "m.text", body: "after unmuting" });
  await waitFor(
    () => room.getUnreadNotificationCount(NotificationCountType.Total) === 1,
    "count 1 for the message after unmuting",
  );
});

await check("room tags and account data round-trip through sync", async () => {
  const room = alice.getRoom(roomId);
  await alice.setRoomTag(roomId, "m.favourite", { order: 0.5 });
  await waitFor(() => room.tags?.["m.favourite"]?.order === 0.5, "the m.favourite tag in sync");
  const tags = await alice.getRoomTags(roomId);
  equal(tags.tags?.["m.favourite"], { order: 0.5 }, "GET tags");
  await alice.deleteRoomTag(roomId, "m.favourite");
  await waitFor(() => !room.tags?.["m.favourite"], "the tag removed in sync");
  const breadcrumbs = { recent_rooms: [roomId] };
  await alice.setAccountData("im.vector.setting.breadcrumbs", breadcrumbs);
  await waitFor(
    () => alice.getAccountData("im.vector.setting.breadcrumbs")?.getContent()?.recent_rooms?.[0] === roomId,
    "breadcrumbs account data in sync",
  );
  const fromServer = await alice.getAccountDataFromServer("im.vector.setting.breadcrumbs");
  equal(fromServer, breadcrumbs, "GET account data");
  equal(await alice.getAccountDataFromServer("im.vector.setting.never_set"), null, "unset account data");
});

await check("a direct chat without a name is named after the other member (summary heroes)", async () => {
  const { room_id: dmId } = await bob.createRoom({ preset: "trusted_private_chat", is_direct: true, invite: [aliceId] });
  await waitFor(() => alice.getRoom(dmId)?.getMyMembership() === "invite", "the DM invite");
  await alice.joinRoom(dmId);
  const dm = await waitFor(() => {
    const room = alice.getRoom(dmId);
    return room?.getMyMembership() === "join" ? room : null;
  }, "alice joined the DM");
  await waitFor(() => dm.name === BOB_NAME, `the DM named "${BOB_NAME}" (is "${dm.name}")`);
});

await check("leaving and forgetting the direct chat removes it from the client", async () => {
  const dm = alice.getRooms().find((room) => room.roomId !== roomId && room.name === BOB_NAME);
  expect(dm, "the direct chat is not on alice's client");
  await alice.leave(dm.roomId);
  await waitFor(() => dm.getMyMembership() === "leave", "the leave in alice's sync");
  await alice.forget(dm.roomId);
  expect(!alice.getRoom(dm.roomId), "the forgotten room is still on the client");
  const { joined_rooms: joined } = await alice.getJoinedRooms();
  expect(!joined.includes(dm.roomId), "the left room is still in joined_rooms");
});

await check("end-to-end encryption: two Rust-crypto clients exchange messages in an encrypted room", async () => {
  // New devices with crypto (Element's path since it moved to the Rust crypto stack): device
  // keys and one-time keys uploaded, keys queried and claimed, the room key sent to-device.
  const aliceCrypto = await passwordLogin("alice", ALICE_PASSWORD, "alice's encrypting device");
  const bobCrypto = await passwordLogin("bob", BOB_PASSWORD, "bob's encrypting device");
  try {
    await aliceCrypto.initRustCrypto({ useIndexedDB: false });
    await bobCrypto.initRustCrypto({ useIndexedDB: false });
    await startAndWaitForSync(aliceCrypto);
    await startAndWaitForSync(bobCrypto);
    const { room_id: secretId } = await bobCrypto.createRoom({
      preset: "private_chat",
      invite: [aliceId],
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
    });
    await waitFor(() => aliceCrypto.getRoom(secretId)?.getMyMembership() === "invite", "the encrypted room's invite");
    await aliceCrypto.joinRoom(secretId);
    await waitFor(
      () => bobCrypto.getRoom(secretId)?.getMember(aliceId)?.membership === "join",
      "alice's join on bob's client",
    );
    equal(await bobCrypto.getCrypto().isEncryptionEnabledInRoom(secretId), true, "encryption enabled in the room");
    await bobCrypto.sendMessage(secretId, { msgtype: "m.text", body: "a secret from bob" });
    const fromBob = await waitFor(
      () => timelineEvents(aliceCrypto.getRoom(secretId)).find((e) => e.getContent().body === "a secret from bob"),
      "bob's encrypted message decrypted on alice's device",
    );
    equal(fromBob.getWireType(), "m.room.encrypted", "the message's type on the wire");
    equal(fromBob.getWireContent().algorithm, "m.megolm.v1.aes-sha2", "the message's algorithm");
    equal(fromBob.getSender(), bobId, "the encrypted message's sender");
    await aliceCrypto.sendMessage(secretId, { msgtype: "m.text", body: "a secret from alice" });
    await waitFor(
      () => timelineEvents(bobCrypto.getRoom(secretId)).find((e) => e.getContent().body === "a secret from alice"),
      "alice's encrypted reply decrypted on bob's device",
    );
  } finally {
    aliceCrypto.stopClient();
    bobCrypto.stopClient();
  }
});

await check("no request the clients made failed with a server error, and start-up endpoints all answered", async () => {
  const serverErrors = requests.filter((request) => request.status >= 500);
  expect(serverErrors.length === 0, `server errors: ${JSON.stringify(serverErrors)}`);
  const startUp = [
    /\/pushrules\/$/,
    /\/capabilities$/,
    /\/versions$/,
    /\/user\/[^/]+\/filter(\/[^/]+)?$/,
    /\/voip\/turnServer$/,
    /\/thirdparty\/protocols$/,
    /\/account\/3pid$/,
    /\/sync$/,
  ];
  const refused = requests.filter(
    (request) => request.status >= 400 && startUp.some((pattern) => pattern.test(request.path)),
  );
  expect(refused.length === 0, `start-up requests refused: ${JSON.stringify(refused)}`);
});

finish();

function finish() {
  alice?.stopClient();
  const notFound = requests.filter((request) => request.status === 404);
  if (notFound.length > 0) {
    say("(404s the SDK met and handled:)");
    const seen = new Set();
    for (const { method, path, errcode, who } of notFound) {
      const line = `  ${method} ${path.replace(/![^/]+/g, "!ROOM").replace(/%21[^/]+/g, "!ROOM")} ${errcode ?? ""}`;
      if (!seen.has(line)) say(line + ` (${who})`);
      seen.add(line);
    }
  }
  say(`js-sdk: ${passed} passed, ${failed} failed`);
  process.exit(failed > 0 ? 1 : 0);
}
