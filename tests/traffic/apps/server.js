// A plain Node HTTP app, as its users write it: no drain logic of its own,
// SIGTERM just closes the server: an app as it is, with no drain logic of its own.
const http = require('http');
// WARMUP=S (bench/peers.py only): 503 for the first S seconds, as an app that warms caches does.
const ready = Date.now() + 1000 * Number(process.env.WARMUP || 0);
const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'text/plain');
  if (Date.now() < ready) {
    res.statusCode = 503;
    res.end('warming up\n');
    return;
  }
  res.end(`hello from ${process.env.VERSION} (${req.headers['x-forwarded-for']})\n`);
});
server.listen(Number(process.env.PORT), '127.0.0.1');
process.on('SIGTERM', () => server.close());
process.on('SIGINT', () => server.close());  // what PM2 sends on reload
