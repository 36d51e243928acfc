// Joins a tree the way SCA's UI does and reports what arrives, one JSON line per event:
//   node client.js <sio1|sio4> <base url> <tree root> <key that finishes>
// Prints {"ready":true} after the first `update` (the tree's current nodes), then
// {"update":[…]} per update; exits 0 once <key that finishes> arrives with status "finished",
// 1 on a malformed update (keys outside the tree, a child before its parent) or after 20 s.
const [, , version, base, root, last] = process.argv;
const io = require(version);
const socket = version === "sio1" ? io(base, { transports: ["websocket", "polling"], forceNew: true }) : io(base);
const fail = (why) => { console.log(JSON.stringify({ error: why })); process.exit(1); };
setTimeout(() => fail("timed out"), 20000);
let ready = false;
socket.on("connect", () => socket.emit("join", root));
socket.on("connect_error", (e) => fail("connect_error " + e));
socket.on("error", (e) => fail("error " + JSON.stringify(e)));
socket.on("update", (nodes) => {
  if (!Array.isArray(nodes)) fail("update is not an array: " + JSON.stringify(nodes));
  const seen = new Set();
  for (const n of nodes) {
    if (n.key !== root && !n.key.startsWith(root + ".")) fail("key outside the tree: " + n.key);
    const parent = n.key.slice(0, n.key.lastIndexOf("."));
    if (nodes.some((m) => m.key === parent) && !seen.has(parent)) fail("child before parent: " + n.key);
    seen.add(n.key);
  }
  if (!ready) { ready = true; console.log(JSON.stringify({ ready: true })); return; }
  console.log(JSON.stringify({ update: nodes }));
  if (nodes.some((n) => n.key === last && n.status === "finished")) { socket.close(); process.exit(0); }
});
