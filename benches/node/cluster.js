// Node's own cluster, answering like examples/hello.rs. WORKERS (default 2), PORT (default 3000);
// NODE_CLUSTER_SCHED_POLICY=rr|none picks the policy. SIGTERM stops everything.
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
  const body = `Hello from worker ${cluster.worker.id} (pid ${process.pid})\n`;
  http.createServer((req, res) => res.end(body)).listen(port, '127.0.0.1');
}
