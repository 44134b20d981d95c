"use strict";

const test = require("tape");
const { slugify, MAX_SLUG } = require("..");

test("words are joined by dashes in lower case", (t) => {
  t.equal(slugify("Hello, World!"), "hello-world");
  t.equal(slugify("  Builds you can   trust  "), "builds-you-can-trust");
  t.end();
});

test("accents are dropped, other scripts left out", (t) => {
  t.equal(slugify("Crème brûlée à Noël"), "creme-brulee-a-noel");
  t.equal(slugify("日本語 and English"), "and-english");
  t.end();
});

test("a slug is never longer than its bound and never ends in a dash", (t) => {
  const slug = slugify("word ".repeat(100));
  t.ok(slug.length <= MAX_SLUG, `${slug.length} <= ${MAX_SLUG}`);
  t.notOk(slug.endsWith("-"));
  t.end();
});

test("anything but a string is refused", (t) => {
  t.throws(() => slugify(42), /takes a string, not number/);
  t.end();
});
