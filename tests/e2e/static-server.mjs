// Serves a directory over HTTP on 127.0.0.1 for the browser tests.
//
// Usage: node static-server.mjs DIR PORT [PREFIX=DIR ...]
// Serves DIR at /, and each extra DIR under its URL PREFIX (for example
// /fixtures/models/=fixtures/models). Prints "listening on http://127.0.0.1:PORT/" once ready.
// Only GET and HEAD are served, and every request is logged to stderr with its method, path and
// status.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';

const [root, portText, ...mountArgs] = process.argv.slice(2);
if (!root || !portText) {
  console.error('usage: node static-server.mjs DIR PORT [PREFIX=DIR ...]');
  process.exit(2);
}
const port = Number(portText);
// Longest prefix first, so that a mount wins over the root.
const mounts = mountArgs
  .map((arg) => {
    const [prefix, dir] = arg.split('=');
    if (!prefix?.startsWith('/') || !prefix.endsWith('/') || !dir) {
      console.error(`invalid mount ${JSON.stringify(arg)}: expected /PREFIX/=DIR`);
      process.exit(2);
    }
    return { prefix, dir: path.resolve(dir) };
  })
  .concat([{ prefix: '/', dir: path.resolve(root) }])
  .sort((a, b) => b.prefix.length - a.prefix.length);

const contentTypes = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.safetensors': 'application/octet-stream',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.svg': 'image/svg+xml',
  '.txt': 'text/plain; charset=utf-8',
};

function resolveFile(urlPath) {
  let decoded;
  try {
    decoded = decodeURIComponent(urlPath.split('?')[0]);
  } catch {
    return null;
  }
  const mount = mounts.find(({ prefix }) => decoded.startsWith(prefix));
  const rootDir = mount.dir;
  const candidate = path.resolve(rootDir, '.' + decoded.slice(mount.prefix.length - 1));
  // Reject paths that escape the served directory (for example "/../etc/passwd").
  if (candidate !== rootDir && !candidate.startsWith(rootDir + path.sep)) {
    return null;
  }
  try {
    const stat = fs.statSync(candidate);
    if (stat.isDirectory()) {
      const index = path.join(candidate, 'index.html');
      return fs.existsSync(index) ? index : null;
    }
    return stat.isFile() ? candidate : null;
  } catch {
    return null;
  }
}

const server = http.createServer((request, response) => {
  const finish = (status, headers, body) => {
    response.writeHead(status, headers);
    response.end(body);
    console.error(`${request.method} ${request.url} ${status}`);
  };

  if (request.method !== 'GET' && request.method !== 'HEAD') {
    finish(405, { 'Content-Type': 'text/plain', Allow: 'GET, HEAD' }, 'method not allowed\n');
    return;
  }
  const file = resolveFile(request.url);
  if (!file) {
    finish(404, { 'Content-Type': 'text/plain' }, 'not found\n');
    return;
  }
  const size = fs.statSync(file).size;
  const type = contentTypes[path.extname(file)] ?? 'application/octet-stream';
  response.writeHead(200, { 'Content-Type': type, 'Content-Length': size, 'Cache-Control': 'no-store' });
  console.error(`${request.method} ${request.url} 200`);
  if (request.method === 'HEAD') {
    response.end();
    return;
  }
  fs.createReadStream(file).pipe(response);
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${port}/`);
});
