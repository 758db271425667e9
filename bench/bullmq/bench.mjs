// BullMQ on the same private redis-server as bench/queue.py, counted as Upstash bills: every command Redis
// runs, those inside BullMQ's Lua scripts included (MONITOR lines from "lua"), and the top-level ones beside.
//
//   node bench/bullmq/bench.mjs REDIS_URL JOBS CONCURRENCY
//
// No-op jobs, added with addBulk (BullMQ's batch add), removed on completion (as seatwatch deletes acknowledged
// entries). Prints one JSON line: jobs, seconds, all_in, top_level, by_command.
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const [url, jobsArg, concArg] = process.argv.slice(2);
const jobs = Number(jobsArg);
const concurrency = Number(concArg);
const FREE = new Set(["ping", "auth", "hello", "select", "info", "config", "command", "reset", "quit", "client"]);
const prefix = `bullbench${Date.now()}`;
const connection = { maxRetriesPerRequest: null };
const redisOpts = (extra = {}) => new IORedis(url, { ...connection, ...extra });

const queue = new Queue("bench", { connection: redisOpts(), prefix });
const worker = new Worker("bench", async () => {}, {
  connection: redisOpts(),
  prefix,
  concurrency,
  autorun: false,
  removeOnComplete: { count: 0 },
  removeOnFail: { count: 1000 },
});
await queue.waitUntilReady();
await worker.waitUntilReady();

const monitorClient = redisOpts();
const monitor = await monitorClient.monitor();
const byCommand = {};
let allIn = 0;
let topLevel = 0;
let counting = false;
monitor.on("monitor", (_time, args, source) => {
  if (!counting) return;
  const cmd = String(args[0]).toLowerCase();
  if (FREE.has(cmd)) return;
  allIn += 1;
  byCommand[cmd] = (byCommand[cmd] || 0) + 1;
  if (source !== "lua") topLevel += 1;
});

let completed = 0;
const done = new Promise((resolve) => {
  worker.on("completed", () => {
    completed += 1;
    if (completed === jobs) resolve();
  });
});
counting = true;
const t0 = Date.now();
for (let i = 0; i < jobs; i += 1000) {
  const n = Math.min(1000, jobs - i);
  await queue.addBulk(Array.from({ length: n }, (_, k) => ({ name: "check", data: { n: i + k } })));
}
worker.run();
await done;
const seconds = (Date.now() - t0) / 1000;
await new Promise((r) => setTimeout(r, 1000)); // the last MONITOR lines
counting = false;
await worker.close();
await queue.close();
monitorClient.disconnect();
console.log(JSON.stringify({ jobs, concurrency, seconds, all_in: allIn, top_level: topLevel, by_command: byCommand }));
process.exit(0);
