// A plain Node HTTP app, as its users write it: no drain logic of its own,
// SIGTERM just closes the server (issue 19's "app as it is").
const http = require('http');
const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'text/plain');
  res.end(`hello from ${process.env.VERSION} (${req.headers['x-forwarded-for']})\n`);
});
server.listen(Number(process.env.PORT), '127.0.0.1');
process.on('SIGTERM', () => server.close());
