#include <stdio.h>
#include <string.h>

/* Prints a greeting; `hello NAME` greets NAME. */
int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "world";
    printf("Hello, %s!\n", name);
    return strlen(name) > 0 ? 0 : 1;
}
