// Turns a title into a URL slug: lower case ASCII letters and digits, words joined by "-".
"use strict";

const MAX_SLUG = 80;

function slugify(title) {
  if (typeof title !== "string") {
    throw new TypeError(`slugify takes a string, not ${typeof title}`);
  }
  const words = title
    .normalize("NFKD")
    .replace(/[\u0300-\u036f]/g, "")
    .toLowerCase()
    .split(/[^a-z0-9]+/)
    .filter((word) => word.length > 0);
  let slug = "";
  for (const word of words) {
    const next = slug.length === 0 ? word : `${slug}-${word}`;
    if (next.length > MAX_SLUG) {
      break;
    }
    slug = next;
  }
  return slug;
}

module.exports = { slugify, MAX_SLUG };
