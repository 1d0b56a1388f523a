"""The text of mini_tts: a seeded template grammar over an embedded English word list.

No text is downloaded. Sentences come from 20 sentence templates (statements, questions,
requests) whose slots are filled uniformly at random from word lists written into this
module: 467 nouns (with their plurals), 266 adjectives, 219 verbs (base, past and third
person forms), 66 adverbs, 91 first names, 50 places, 37 time phrases, numbers and
function words -- 2,125 distinct word forms (:func:`word_inventory`), all plain a-z words.
The default 3,000-sentence train set uses 1,942 of them. The sentences are
grammatical but mostly nonsensical ("the rusty kettle painted a shy parrot near the
harbor"), 5 to 15 words long.

The corpus is a single stream of *unique* sentences drawn with :class:`random.Random`
seeded by ``seed``; sentence ``k`` of the stream goes to ``test`` when ``k % 20 == 0``, to
``dev`` when ``k % 20 == 1`` and to ``train`` otherwise. Hence the splits are disjoint, and
utterance ``i`` of a split does not depend on the sizes asked for: a 10,000-utterance train
set starts with the 3,000-utterance one, and dev/test are the same for both.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

__all__ = ["SentenceGenerator", "unique_sentences", "split_sentences", "word_inventory", "SPLIT_PERIOD"]

# ----------------------------------------------------------------------------------------
# Word lists. "word/plural" or "base/past" gives an irregular form; others follow the rules.
# ----------------------------------------------------------------------------------------
_NOUNS = """
acorn anchor ant apple apron arrow artist aunt axe baby badge bag baker bakery ball balloon
banana band bandage bank barn barrel basket bat beach bean bear beard bed bee beetle bell
belt bench berry/berries bicycle bird blanket blossom boat bone bonnet book boot bottle
bouquet bowl box/boxes boy bracelet branch/branches bread brick bridge broom brother
brush/brushes bucket buffalo/buffaloes building bull bus/buses bush/bushes butterfly/butterflies
button cabbage cabin cake calendar camel camera candle canoe cap captain car card carpet
carriage carrot cart castle cat caterpillar cave chain chair cherry/cherries chicken
child/children chimney church/churches circle city/cities cliff clock cloud clown coat
coconut coin collar compass/compasses cookie corner costume cottage cousin cow crab cradle
crane crayon cricket crow crown cucumber cup curtain cushion daisy/daisies dancer dentist
desk dessert diamond dinner dish/dishes doctor dog doll dolphin donkey door dragon drawer
dress/dresses drum duck eagle ear egg elephant engine engineer envelope eye falcon
family/families farmer feather fence ferry/ferries fiddle field finger fireplace fish/fish
flag flashlight flower flute foot/feet forest fork fossil fountain fox/foxes friend frog
garage garden gate ghost giant gift girl glacier glass/glasses glove goat goblet
goose/geese gorilla grape guitar hamster hammer hammock hand harbor harp hat hedge helmet
hill hive hook horn horse hospital hotel house iceberg island jacket jar jellyfish/jellyfish
jewel judge kangaroo kayak kettle key king kitchen kite kitten knife/knives koala ladder
lake lamb lamp lantern leaf/leaves lemon letter library/libraries lighthouse lion lizard
loaf/loaves lobster lock machine magazine magnet mailbox/mailboxes man/men map maple marble
market mask mattress/mattresses meadow melon merchant microscope mirror mitten mole monkey
moon moth mountain mouse/mice muffin museum mushroom nail napkin necklace needle nest net
newspaper noodle notebook novel nurse oar ocean office onion orange orchard ostrich/ostriches
otter oven owl paddle pail painter palace pan pancake panther paper parachute parcel parrot
path peach/peaches peacock peanut pear pebble pelican pencil penguin pepper piano picture
pie pig piglet pillar pillow pilot pipe pirate pizza planet plate plum pocket poet pond
porch/porches poster pot potato/potatoes prince princess/princesses pumpkin puppy/puppies
puzzle queen quilt rabbit raccoon radio raft rainbow raven ribbon ring river road robot
rocket rock roof room rope rose saddle sailboat sailor sandal sandwich/sandwiches satellite
saucer scarf/scarves school scooter seal seed shark sheep/sheep shelf/shelves shell ship
shirt shoe shop shovel singer sister skeleton skirt sled slipper snail snake sock sofa
soldier song spaceship spider sponge spoon squirrel stable stadium staircase stamp star
statue stick stone story/stories stove street suitcase sunflower swan sweater sword table
tail teacher teacup teapot telephone telescope tent thimble ticket tiger toad tomato/tomatoes
tooth/teeth torch/torches tortoise towel tower town toy tractor trailer train tree trophy/trophies
truck trumpet tulip tunnel turtle umbrella uncle unicorn valley vase vegetable vest village
violin volcano/volcanoes wagon waiter wall wallet walnut walrus/walruses wardrobe
watch/watches waterfall whale wheel wheelbarrow whistle window windmill wing wizard
wolf/wolves woman/women worm wreath writer yacht yard zebra
"""

_PLACES = """
airport attic bakery barn basement beach bridge castle cave cellar church cliff desert
factory farm forest garage garden hallway harbor hospital hotel island jungle kitchen lake
library lighthouse market meadow mountain museum office orchard palace park playground porch
river school square stable stadium station theater tower tunnel valley village zoo
"""

_ADJECTIVES = """
ancient angry awkward bitter black blank blue bold brave bright brilliant broken brown bumpy
busy calm careful cheerful chilly clean clever clumsy coarse cold colorful cozy cranky creamy
creepy crimson crisp crooked crowded cruel curious damp dangerous dark dear deep delicate
dirty dizzy dull dusty eager early easy elegant empty enormous faint famous fancy fast
fearless fierce filthy fine firm flat fluffy foggy fortunate fragile frail fresh friendly
frozen funny fuzzy generous gentle gigantic glad gloomy glossy golden gorgeous graceful grand
grateful gray greedy green grumpy handsome happy hard harsh hasty healthy heavy helpful hidden
hollow honest hot huge humble hungry icy important innocent jagged jealous jolly juicy keen
kind large lazy lean light little lively lonely long loud lovely loyal lucky magic mellow
messy mighty mild misty modern moist muddy narrow naughty neat nervous new nimble noisy
obedient odd old ordinary pale patient peaceful pink plain pleasant plump polished polite
poor powerful precious pretty prickly proud purple quaint quick quiet ragged rapid rare
reckless red restless rich ripe roaring rough round royal rugged rusty sad salty scarlet
scary scruffy secret selfish serious shaggy shallow sharp shiny short shy silent silly silver
simple sincere skinny sleepy slim slippery slow sly small smoky smooth snowy soft solemn sour
sparkling speedy spicy splendid spotted square stale steady steep sticky stormy strange
strong stubborn sturdy sudden sunny sweet swift tall tame tangled tasty tender tense thick
thin thirsty tidy timid tiny tired tough tremendous tricky troubled ugly unusual vast velvet
violet vivid warm weak wet white wicked wide wild windy wise witty wobbly wonderful wooden
worried wrinkled yellow young
"""

_TRANSITIVE_VERBS = """
accept admire bake boil borrow bring/brought brush build/built burn bury buy/bought call
carry catch/caught chase check chop/chopped choose/chose clean climb close collect cook count
cover crush cut/cut deliver describe destroy dig/dug discover drag/dragged draw/drew
drop/dropped eat/ate examine explore feed/fed feel/felt fetch fill find/found fix fold
follow forget/forgot forgive/forgave freeze/froze give/gave grab/grabbed greet grow/grew
guard hang/hung hear/heard help hide/hid hit/hit hold/held hug/hugged hunt inspect invite
juggle keep/kept kick kiss knock leave/left lend/lent lift like load lock lose/lost love
mark measure mend miss mix move need notice obey offer open order pack paint pass pick
pinch place plant play polish pour praise print protect pull push question raise read/read
remember repair rescue return ride/rode ring/rang roll scrub/scrubbed search see/saw
sell/sold send/sent shake/shook share show sing/sang sketch smell spill spin/spun squeeze
stack stamp steal/stole stir/stirred strike/struck study stretch sweep/swept take/took
teach/taught tear/tore tease test throw/threw tie toss touch trade trust unlock visit warn
wash watch wave wear/wore weigh wipe win/won wrap/wrapped write/wrote
"""

_INTRANSITIVE_VERBS = """
arrive bark blink bounce breathe cough crawl cry dance drift fall/fell float fly/flew gallop
giggle glow grin/grinned hop/hopped howl hum/hummed hurry jump kneel/knelt laugh listen march
nod/nodded pause rest roar run/ran rush sail shiver shout sigh sit/sat skip/skipped
sleep/slept slide/slid smile sneeze snore sparkle splash stand/stood stare stumble swim/swam
travel/traveled tremble tumble vanish wait walk wander whisper wink wobble yawn
"""

_ADVERBS = """
angrily badly barely boldly bravely briefly calmly carefully cheerfully eagerly easily
foolishly freely gently gladly gracefully happily kindly lazily lightly loudly neatly
nervously noisily openly patiently playfully politely proudly quickly quietly rarely
rudely sadly secretly sharply shyly silently sleepily slowly smoothly softly sternly
suddenly swiftly tenderly truly warmly wildly wisely again often always never sometimes
early late soon together alone outside inside upstairs downstairs everywhere nearby
"""

_NAMES = """
adam agnes albert alice amelia anna arthur beatrice benjamin caroline charlotte clara daniel
david diana dorothy edgar edward eleanor elsie emily emma ethan felix fiona frank george
gordon grace hannah harold hazel helen henry isaac isabel ivan jack jacob james jane joseph
julia kate laura leo leonard lily louise lucas lucy marcus margaret martha martin mary
matthew maya michael miriam nancy nathan nora norman oliver olivia oscar patrick paul peter
philip rachel raymond rebecca robert rose ruby samuel sarah simon sophia stella theodore
thomas victor victoria vincent walter wendy william zoe
"""

_NUMBERS = "two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty"
_PREPOSITIONS = "above across along around behind below beneath beside beyond inside near past through toward under"
_DAYS = "monday tuesday wednesday thursday friday saturday sunday"
_MONTHS = "january february march april may june july august september october november december"
_TIMES = """
yesterday|today|tomorrow|this morning|last night|at noon|at midnight|in the evening|every day
|last week|next year|after lunch|before dinner|at dawn|in the summer|in the winter|in the spring
|in the autumn
"""
_SUBJECT_PRONOUNS = "i you we they he she"


def _words(text: str) -> list[str]:
    return text.split()


def _phrases(text: str) -> list[str]:
    return [" ".join(chunk.split()) for chunk in text.split("|") if chunk.strip()]


def _plural(word: str) -> str:
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def _forms(text: str, rule: Callable[[str], str]) -> list[tuple[str, str]]:
    """``[(word, derived form)]`` where ``word/form`` overrides the ``rule``."""
    pairs = []
    for item in text.split():
        base, _, irregular = item.partition("/")
        pairs.append((base, irregular or rule(base)))
    return pairs


NOUNS = _forms(_NOUNS, _plural)  # (singular, plural)
PLACES = _words(_PLACES)
ADJECTIVES = _words(_ADJECTIVES)
TRANSITIVE = [(b, p, _third_person(b)) for b, p in _forms(_TRANSITIVE_VERBS, _past)]  # (base, past, 3rd)
INTRANSITIVE = [(b, p, _third_person(b)) for b, p in _forms(_INTRANSITIVE_VERBS, _past)]
ADVERBS = _words(_ADVERBS)
NAMES = _words(_NAMES)
NUMBERS = _words(_NUMBERS)
PREPOSITIONS = _words(_PREPOSITIONS)
TIMES = _phrases(_TIMES) + [f"on {d}" for d in _words(_DAYS)] + [f"in {m}" for m in _words(_MONTHS)]
SUBJECT_PRONOUNS = _words(_SUBJECT_PRONOUNS)
DETERMINERS = ["the", "a", "the", "this", "that", "my", "his", "her", "our", "their", "every"]
PLURAL_DETERMINERS = ["the", "some", "these", "those", "many", "all the", *NUMBERS]
_AN_EXCEPTIONS = {"unicorn", "unusual", "uniform", "useful"}  # vowel letter, consonant sound


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" and word not in _AN_EXCEPTIONS else "a"


class SentenceGenerator:
    """Random sentences from the template grammar; ``sentence()`` returns lower-case words.

    All randomness comes from ``random.Random(seed)``, whose ``choice``/``random`` sequence is
    stable across Python versions for integer seeds.
    """

    MIN_WORDS, MAX_WORDS = 5, 15

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.templates = [getattr(self, name) for name in sorted(dir(self)) if name.startswith("_t_")]

    def sentence(self) -> str:
        """One sentence of ``MIN_WORDS``..``MAX_WORDS`` words, e.g. ``"the old owl sighed"``."""
        while True:
            words = " ".join(self.rng.choice(self.templates)()).split()
            if self.MIN_WORDS <= len(words) <= self.MAX_WORDS:
                return " ".join(words)

    # --- phrase builders ---------------------------------------------------------------
    def _pick(self, items):
        return self.rng.choice(items)

    def _maybe(self, probability: float, make: Callable[[], str]) -> str:
        return make() if self.rng.random() < probability else ""

    def adj(self) -> str:
        return self._pick(ADJECTIVES)

    def np(self) -> str:
        """Singular noun phrase: determiner, optional adjective, noun."""
        noun = self._pick(NOUNS)[0]
        head = " ".join(filter(None, [self._maybe(0.6, self.adj), noun]))
        det = self._pick(DETERMINERS)
        return f"{_article(head) if det == 'a' else det} {head}"

    def np_plural(self) -> str:
        noun = self._pick(NOUNS)[1]
        det = self._pick(PLURAL_DETERMINERS)
        return " ".join(filter(None, [det, self._maybe(0.5, self.adj), noun]))

    def subject(self) -> str:
        return self._pick([self.np, self.name, self.np])()

    def name(self) -> str:
        return self._pick(NAMES)

    def place(self) -> str:
        return " ".join(filter(None, ["the", self._maybe(0.4, self.adj), self._pick(PLACES)]))

    def pp(self) -> str:
        return f"{self._pick(PREPOSITIONS)} {self.place()}"

    def time(self) -> str:
        return self._pick(TIMES)

    def vt(self, form: int) -> str:
        return self._pick(TRANSITIVE)[form]

    def vi(self, form: int) -> str:
        return self._pick(INTRANSITIVE)[form]

    def adv(self) -> str:
        return self._pick(ADVERBS)

    # --- templates (each returns a list of phrases) ------------------------------------
    def _t_action(self):
        return [self.subject(), self.vt(1), self.np(), self._maybe(0.6, self.pp)]

    def _t_motion(self):
        return [self.subject(), self.vi(1), self._maybe(0.5, self.adv), self.pp()]

    def _t_pair(self):
        return [self.name(), "and", self.name(), self.vt(1), self.np_plural(), self._maybe(0.5, self.time)]

    def _t_question(self):
        return ["did", self.subject(), self.vt(0), self.np(), self._maybe(0.5, self.pp)]

    def _t_future(self):
        return [self._pick(SUBJECT_PRONOUNS), "will", self.vt(0), self.np_plural(), self.time()]

    def _t_there(self):
        return self._pick([["there", "was", self.np(), self.pp()], ["there", "were", self.np_plural(), self.pp()]])

    def _t_habit(self):
        return [self.name(), self._pick(["always", "often", "never", "sometimes"]), self.vt(2), self.np_plural()]

    def _t_said(self):
        return [self.name(), "said", "that", self.np(), "was", self.adj(), "and", self.adj()]

    def _t_why(self):
        return ["why", "did", self.subject(), self.vi(0), self.pp()]

    def _t_time_first(self):
        return [self.time(), self.subject(), self.vi(1), self.adv()]

    def _t_because(self):
        return [self.subject(), "could", "not", self.vt(0), self.np(), "because", "it", "was", "too", self.adj()]

    def _t_please(self):
        return ["please", self.vt(0), self.np(), self.pp()]

    def _t_of(self):
        return [self.np(), "of", self.np(), self.vi(1), self._maybe(0.7, self.adv)]

    def _t_think(self):
        return ["i", "think", self.name(), self.vt(1), self.np(), self._maybe(0.5, self.time)]

    def _t_state(self):
        return [self.np_plural(), self._pick(["are", "were", "seem", "looked"]), self.adj(), self._maybe(0.6, self.pp)]

    def _t_how_many(self):
        return ["how", "many", self._pick(NOUNS)[1], "did", self.name(), self.vt(0), self.time()]

    def _t_and(self):
        return [self.subject(), self.vt(1), self.np(), "and", self.vt(1), self.np()]

    def _t_when(self):
        return ["when", self.np(), self.vi(1), self._pick(SUBJECT_PRONOUNS), self.vt(1), self.np()]

    def _t_going(self):
        return [self.name(), "is", "going", "to", self.vt(0), self.np(), self._maybe(0.5, self.pp)]

    def _t_count(self):
        return [self._pick(NUMBERS), self._maybe(0.5, self.adj), self._pick(NOUNS)[1], self.vi(1), self.pp()]


#: Sentence ``k`` of the stream goes to test if ``k % SPLIT_PERIOD == 0``, dev if ``== 1``.
SPLIT_PERIOD = 20


def unique_sentences(seed: int = 0) -> Iterator[str]:
    """Endless stream of distinct sentences (duplicates of earlier ones are skipped)."""
    generator, seen = SentenceGenerator(seed), set()
    while True:
        sentence = generator.sentence()
        if sentence not in seen:
            seen.add(sentence)
            yield sentence


def split_sentences(num_train: int, num_dev: int, num_test: int, seed: int = 0) -> dict[str, list[str]]:
    """Disjoint ``{"train", "dev", "test"}`` sentence lists of the requested sizes.

    Sentence ``k`` of :func:`unique_sentences` goes to test when ``k % 20 == 0``, to dev when
    ``k % 20 == 1`` and to train otherwise; each split keeps its first ``num_*`` sentences.
    """
    wanted = {"train": num_train, "dev": num_dev, "test": num_test}
    for split, count in wanted.items():
        if count < 0:
            raise ValueError(f"num_{split} must be >= 0, got {count}")
    splits: dict[str, list[str]] = {s: [] for s in wanted}
    stream = unique_sentences(seed)
    for k in range(10**9):
        if all(len(splits[s]) >= wanted[s] for s in wanted):
            break
        sentence = next(stream)
        split = "test" if k % SPLIT_PERIOD == 0 else "dev" if k % SPLIT_PERIOD == 1 else "train"
        if len(splits[split]) < wanted[split]:
            splits[split].append(sentence)
    return splits


def word_inventory() -> list[str]:
    """Every word the grammar can produce (sorted), the upper bound of the corpus vocabulary."""
    words = set(ADJECTIVES + ADVERBS + NAMES + NUMBERS + PREPOSITIONS + PLACES + SUBJECT_PRONOUNS)
    words.update(w for phrase in DETERMINERS + PLURAL_DETERMINERS for w in phrase.split())
    words.update(w for forms in NOUNS + TRANSITIVE + INTRANSITIVE for w in forms)
    words.update(w for phrase in TIMES for w in phrase.split())
    words.update("did will there was were said that and could not because it too please of think "
                 "are seem looked why how many is going to when an always often never sometimes".split())
    return sorted(words)
