#include "definition.h"
