"""A built-in English word list and a seeded random-sentence generator for the corpus' speech.

The sentences need not mean anything: they exist to give espeak-ng varied phoneme sequences
(every English viseme, stressed and unstressed syllables, short and long words) and natural
prosody (statements, questions, exclamations, commas that make short pauses).
"""

from __future__ import annotations

import numpy as np

# ~600 common English words: function words (frequent, unstressed) and content words of 1-4 syllables
# chosen to cover bilabials (p b m), labiodentals (f v), rounded vowels (oo, o, w), wide vowels (ee),
# open vowels (ah), dentals (th) and post-alveolars (sh, ch, j).
FUNCTION_WORDS: tuple[str, ...] = tuple("""
the a an and but or so if then than that this these those there here where when why how what which who
whom whose of to in on at by for with from about into over under after before between through during
without around against among up down out off near far is are was were be been being am do does did have
has had will would can could should shall may might must not no yes very just still also only even too
quite really again always never often sometimes soon now today tonight tomorrow yesterday I you he she it
we they me him her us them my your his its our their mine yours some any every each all both many much
more most few less least other another such own same
""".split())

CONTENT_WORDS: tuple[str, ...] = tuple(dict.fromkeys("""
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother father area money story fact month
lot right study book eye job word business issue side kind head house service friend power hour game line
end member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education foot boy age policy music market sense nation plan college
interest death experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm
difference value building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need court oil
situation cost industry figure street image phone data picture practice piece land product doctor wall
patient worker news test movie north love support technology step baby computer type attention film
tree source organization hair window evidence population truth song energy economy
bubble mummy puppy pebble pepper maple apple bottle button baseball bamboo member summer shimmer
moon spoon blue shoe noodle boot soup moose zoo room food school pool juice fruit loose goose rule
wool cook foot book hook good wood would could should full pull push bush sugar woman
boat coat goat road soap rope home phone stone bone alone ocean over open only old cold gold hold
ball wall call fall hall talk walk chalk saw law dog log frog long song strong wrong coffee office
cheese tree green queen seat meat feet street sleep sheep deep keep week peace piece people easy
father calm palm car star far hard park dark art heart garden party large
fish dish wish shop ship shoe show shine shadow fashion ocean nation station motion
church cheap chair chance change choose chicken kitchen watch catch match teach reach
judge jump joy juice large bridge edge village orange page engine
think thank thing three throw thunder thirty earth birth month mouth south north
that this with weather feather brother mother other together rather either whether
vase voice very valley video violin village river seven eleven over never clever
fire five fine family funny finger photo phone coffee laugh rough enough
window water wave wind winter wonder world work warm wash weather wheel white whisper
yellow yes young yard year yesterday yogurt
quick quiet queen question quarter quality
zebra zero zone lazy crazy puzzle
big small little tall short long wide narrow round flat bright dark happy sad angry calm
beautiful careful wonderful important different possible simple special strange gentle
red blue green yellow purple orange brown black white silver golden
one two three four five six seven eight nine ten twenty hundred thousand million first second last
go come see look watch listen hear speak say tell ask answer call move run walk swim fly drive ride
open close start stop begin finish bring take give keep hold carry push pull throw catch build break
make find lose win play sing dance laugh smile cry sleep wake eat drink cook bake wash clean paint
write read draw learn teach know think believe remember forget understand explain imagine wonder
love like want need hope wish try help share show follow lead meet visit travel return arrive leave
buy sell pay spend save borrow lend send receive choose decide agree argue promise change grow
beautifully quickly slowly quietly loudly gently happily suddenly finally certainly probably perhaps
maybe almost already always usually nearly simply exactly
banana tomato potato chocolate vanilla butterfly elephant umbrella telephone computer
television elevator hospital restaurant library museum airport mountain island forest desert
rainbow sunshine moonlight thunder lightning weather autumn spring winter summer
monday tuesday wednesday thursday friday saturday sunday january february
morning evening afternoon midnight breakfast dinner supper lunch picnic
""".split()))

ALL_WORDS: tuple[str, ...] = tuple(dict.fromkeys(FUNCTION_WORDS + CONTENT_WORDS))  # de-duplicated, ordered


def random_sentence(rng: np.random.Generator, n_words: int) -> str:
    """A sentence of `n_words` words: mostly alternating function and content words (so the stress
    pattern resembles English), first letter capitalised, maybe a comma, and `.`, `?` or `!` at the end."""
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    words: list[str] = []
    for i in range(n_words):
        pool = FUNCTION_WORDS if (i % 2 == 0 and rng.random() < 0.55 and i < n_words - 1) else CONTENT_WORDS
        words.append(str(pool[int(rng.integers(len(pool)))]))
    if n_words >= 5 and rng.random() < 0.35:  # a comma: a short pause inside the phrase
        k = int(rng.integers(2, n_words - 1))
        words[k - 1] += ","
    words[0] = words[0][0].upper() + words[0][1:]
    end = rng.choice([".", ".", ".", "?", "!"])
    return " ".join(words) + str(end)
