// Connects with a token and tries to join a key, reporting one JSON line:
//   node auth.js <base url> <token or "-"> <"auth"|"query"> <key>
// {"connect_error": message} when the connection is refused, {"error": message} when the join
// is, {"joined": true} when the first `update` arrives; exits after 10 s at most.
const [, , base, token, how, key] = process.argv;
const io = require("sio4");
const opts = { forceNew: true, reconnection: false };
if (token !== "-" && how === "auth") opts.auth = { token };
if (token !== "-" && how === "query") opts.query = { token };
const socket = io(base, opts);
const done = (line) => { console.log(JSON.stringify(line)); socket.close(); process.exit(0); };
setTimeout(() => done({ timeout: true }), 10000);
socket.on("connect", () => socket.emit("join", key));
socket.on("connect_error", (e) => done({ connect_error: String(e && e.message) }));
socket.on("error", (e) => done({ error: e }));
socket.on("update", () => done({ joined: true }));
