#include "pgtest.h"
