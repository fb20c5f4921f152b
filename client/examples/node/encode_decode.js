// Encode an image file on a latentd server and decode it back, using only the .proto contract.
//   node encode_decode.js HOST:PORT INPUT.png OUTPUT.png [PROTO_ROOT]
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, input, output, protoRoot] = process.argv.slice(2);
if (!target || !input || !output) {
  console.error('usage: node encode_decode.js HOST:PORT INPUT OUTPUT [PROTO_ROOT]');
  process.exit(2);
}
const root = protoRoot || path.join(__dirname, '..', '..', '..', 'protos');
const definition = protoLoader.loadSync('latentd/v1/latentd.proto', {
  includeDirs: [root], keepCase: true, longs: Number, enums: String, defaults: true,
});
const latentd = grpc.loadPackageDefinition(definition).latentd.v1;
const client = new latentd.Latentd(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 60000);

function fail(what, error) {
  console.error(`${what} failed: ${error.code} ${error.details}`);
  process.exit(1);
}

const request = {images: [{encoded: fs.readFileSync(input)}], options: {latent_dtype: 'FLOAT16'}};
client.Encode(request, {deadline: deadline()}, (error, encoded) => {
  if (error) fail('Encode', error);
  const item = encoded.items[0];
  console.log(JSON.stringify({model: encoded.model, dtype: item.latents.dtype, shape: item.latents.shape,
                              bytes: item.latents.data.length, height: item.height, width: item.width}));
  const decodeRequest = {items: [{latents: item.latents, height: item.height, width: item.width}],
                         options: {format: 'PNG'}};
  client.Decode(decodeRequest, {deadline: deadline()}, (error2, decoded) => {
    if (error2) fail('Decode', error2);
    fs.writeFileSync(output, decoded.images[0].encoded);
    client.close();
  });
});
