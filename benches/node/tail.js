// Node's cluster for the tail benchmark: `GET /block/<ms>` blocks the worker's event loop that
// long without using a CPU (Atomics.wait), as benches/src/bin/tail.rs does. WORKERS (default 2),
// PORT (default 3000); NODE_CLUSTER_SCHED_POLICY=rr|none picks the policy. SIGTERM stops everything.
const cluster = require('node:cluster');
const http = require('node:http');

const workers = Number(process.env.WORKERS || 2);
const port = Number(process.env.PORT || 3000);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  process.on('SIGTERM', () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGKILL');
    process.exit(0);
  });
} else {
  const cell = new Int32Array(new SharedArrayBuffer(4));
  http.createServer((req, res) => {
    const match = /^\/block\/(\d+)$/.exec(req.url);
    if (match) Atomics.wait(cell, 0, 0, Number(match[1]));
    res.end('ok\n');
  }).listen(port, '127.0.0.1');
}
