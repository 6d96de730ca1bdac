// A real OpenID Connect provider (panva's node-oidc-provider, OpenID
// Certified) for Herald's tests: served over HTTPS with the certificate the
// test made, signing ES256 access tokens for the audience the test names.
//
//   node oidc-provider.mjs CERT_PEM KEY_PEM CA_PEM AUDIENCE
//
// Prints one JSON line {"issuer", "token"} once it serves: `token` is an
// access token for AUDIENCE obtained from its own token endpoint with the
// client_credentials grant (sub = the client id, `herald-test-client`), over
// HTTPS checked against CA_PEM. It serves until stdin closes.
import fs from 'node:fs';
import https from 'node:https';
import { exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';

const [certFile, keyFile, caFile, audience] = process.argv.slice(2);
const server = https.createServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `https://127.0.0.1:${server.address().port}`;

const { privateKey } = await generateKeyPair('ES256', { extractable: true });
const signing = { ...(await exportJWK(privateKey)), kid: 'oidc-provider-es256', alg: 'ES256', use: 'sig' };
const client = { id: 'herald-test-client', secret: 'herald-test-client-secret' };
const provider = new Provider(issuer, {
  clients: [{
    client_id: client.id,
    client_secret: client.secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: 'ES256', // the only key it holds
  }],
  jwks: { keys: [signing] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        audience,
        scope: '',
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
});
server.on('request', provider.callback());

const response = await new Promise((resolve, reject) => {
  const body = new URLSearchParams({
    grant_type: 'client_credentials',
    client_id: client.id,
    client_secret: client.secret,
  }).toString();
  const request = https.request(`${issuer}/token`, {
    method: 'POST',
    ca: fs.readFileSync(caFile),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  }, (answer) => {
    let text = '';
    answer.on('data', (chunk) => { text += chunk; });
    answer.on('end', () => resolve({ status: answer.statusCode, text }));
  });
  request.on('error', reject);
  request.end(body);
});
if (response.status !== 200) {
  console.error(`token endpoint answered ${response.status}: ${response.text}`);
  process.exit(1);
}
console.log(JSON.stringify({ issuer, token: JSON.parse(response.text).access_token }));
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
